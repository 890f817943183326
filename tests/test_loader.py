"""The checkpoint loader against hostile or broken checkpoints: files outside the checkpoint
directory (index entries with `..`, absolute paths, symlinks), tokenizers that ask to run code,
malformed safetensors headers and indexes, float64 checkpoints."""

import builtins
import json
import os
import struct

import pytest
import torch

from lfm_kernels.model import LfmModel, allocate, config_from_dict, fill_random, from_pretrained, save_pretrained

pytest.importorskip("transformers")  # save_pretrained writes config.json through transformers' config
from safetensors.torch import load_file, save_file  # noqa: E402

from conftest import tiny_moe_config, write_word_tokenizer  # noqa: E402

_CFG = tiny_moe_config(max_position_embeddings=64)


def _model(dtype=torch.float32, seed=0):
    cfg = config_from_dict(dict(_CFG))
    weights, _, _ = allocate(cfg, dtype)
    fill_random(weights, cfg, seed=seed, progress=False, std=0.2)
    return LfmModel(cfg, weights, dtype)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A small checkpoint in several shards (with model.safetensors.index.json)."""
    path = tmp_path_factory.mktemp("sharded")
    save_pretrained(_model(), str(path), max_shard_bytes=4 << 10)
    assert os.path.isfile(path / "model.safetensors.index.json")
    return path


def _copy_dir(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


def _set_index(path, rewrite):
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    data["weight_map"] = {k: rewrite(v) if v == first else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    return first


# ----------------------------------------------------------------------------- containment
@pytest.mark.parametrize("target", ["relative", "absolute"])
@pytest.mark.parametrize("exists", [True, False], ids=["target-exists", "target-missing"])
def test_index_entries_outside_the_directory_are_refused(sharded, tmp_path, target, exists):
    """`../` and absolute shard names: one ValueError, the same whether the target exists or not, and
    nothing of the target's contents in it."""
    outside = tmp_path / "secret.safetensors"
    if exists:
        outside.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00TOPSECRET-BYTES!")
    ckpt = _copy_dir(sharded, tmp_path / "ckpt")
    name = "../secret.safetensors" if target == "relative" else str(outside)
    _set_index(ckpt, lambda _: name)
    with pytest.raises(ValueError, match="outside the checkpoint directory") as info:
        from_pretrained(ckpt, progress=False, tokenizer=False)
    msg = str(info.value)
    assert "TOPSECRET" not in msg and "exist" not in msg.replace("outside", "")


def test_refusal_does_not_tell_whether_the_target_exists(sharded, tmp_path):
    """No oracle: the error for an existing target and for a missing one read the same."""
    (tmp_path / "present.safetensors").write_bytes(b"\x00" * 64)
    msgs = []
    for name in ("present", "absent"):
        ckpt = _copy_dir(sharded, tmp_path / f"ckpt_{name}")
        _set_index(ckpt, lambda _: f"../{name}.safetensors")
        with pytest.raises(Exception) as info:
            from_pretrained(ckpt, progress=False, tokenizer=False)
        msgs.append((type(info.value), str(info.value).replace(str(ckpt), "<ckpt>").replace(name, "<name>")))
    assert msgs[0] == msgs[1]


def test_symlinked_shard_leaving_the_directory_is_refused(sharded, tmp_path):
    ckpt = _copy_dir(sharded, tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    real = tmp_path / "elsewhere.safetensors"
    os.replace(ckpt / shard, real)  # a valid shard, only outside: refused for where it is, not what it holds
    os.symlink(real, ckpt / shard)
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        from_pretrained(ckpt, progress=False, tokenizer=False)


def test_symlinked_single_file_and_config_leaving_the_directory_are_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_pretrained(_model(), str(ckpt))
    outside = tmp_path / "out"
    outside.mkdir()
    os.replace(ckpt / "model.safetensors", outside / "model.safetensors")
    os.symlink(outside / "model.safetensors", ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        from_pretrained(ckpt, progress=False, tokenizer=False)
    os.remove(ckpt / "model.safetensors")
    os.replace(outside / "model.safetensors", ckpt / "model.safetensors")
    os.replace(ckpt / "config.json", outside / "config.json")
    os.symlink(outside / "config.json", ckpt / "config.json")
    with pytest.raises(ValueError, match="'config.json' resolves outside"):
        from_pretrained(ckpt, progress=False, tokenizer=False)


def test_symlinked_tokenizer_file_leaving_the_directory_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_pretrained(_model(), str(ckpt))
    (tmp_path / "passwd").write_text("root:x:0:0")
    os.symlink(tmp_path / "passwd", ckpt / "tokenizer.json")
    with pytest.raises(ValueError, match="'tokenizer.json' resolves outside"):
        from_pretrained(ckpt, progress=False)
    os.remove(ckpt / "tokenizer.json")
    os.symlink(tmp_path / "missing", ckpt / "tokenizer.json")  # a dangling link: the same error, no oracle
    with pytest.raises(ValueError, match="'tokenizer.json' resolves outside"):
        from_pretrained(ckpt, progress=False)


def test_symlinks_inside_the_directory_and_hub_snapshots_load(tmp_path):
    """Allowed: a symlink to a file inside the checkpoint, and the Hugging Face cache layout whose
    snapshot files are symlinks into the same repository's blobs/."""
    model = _model()
    ckpt = tmp_path / "ckpt"
    save_pretrained(model, str(ckpt))
    (ckpt / "sub").mkdir()
    os.replace(ckpt / "model.safetensors", ckpt / "sub" / "weights.bin")
    os.symlink("sub/weights.bin", ckpt / "model.safetensors")
    loaded = from_pretrained(ckpt, progress=False, tokenizer=False)
    assert torch.equal(loaded.weights.embed, model.weights.embed)

    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, name in enumerate(("config.json", "model.safetensors")):
        src = ckpt / "sub" / "weights.bin" if name == "model.safetensors" else ckpt / name
        os.replace(src, blobs / f"blob{i}")
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snap / name)
    loaded = from_pretrained(snap, progress=False, tokenizer=False)
    assert torch.equal(loaded.weights.embed, model.weights.embed)


# ----------------------------------------------------------------------------- tokenizer code
def test_tokenizer_custom_code_never_runs_and_never_prompts(tmp_path, monkeypatch):
    """A tokenizer_config.json that asks for custom code: the code is not imported, stdin is not read
    (transformers would otherwise ask "run custom code? [y/N]"), and the plain tokenizer.json loads."""
    ckpt = tmp_path / "ckpt"
    save_pretrained(_model(), str(ckpt))
    write_word_tokenizer(ckpt, 37)
    marker = tmp_path / "code-ran"
    (ckpt / "evil_tok.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer",
        "auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]},
    }))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    asked = []

    def fake_input(prompt=""):
        asked.append(prompt)
        return "y"  # what a user pressing "y" would answer

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr("transformers.dynamic_module_utils.TIME_OUT_REMOTE_CODE", 15, raising=False)
    model = from_pretrained(ckpt, progress=False)
    assert not asked, "loading asked on stdin whether to run checkpoint code"
    assert not marker.exists(), "checkpoint code ran"
    assert model.tokenizer is not None and model.tokenizer.encode("w3 w4", add_special_tokens=False) == [12, 13]


# ----------------------------------------------------------------------------- malformed files
def _raw_safetensors(path, header_bytes, data=b""):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        f.write(data)


def _single(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_pretrained(_model(), str(ckpt))
    return ckpt


def _header(ckpt):
    raw = (ckpt / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("not-json", r"model\.safetensors: safetensors header is not valid JSON"),
        ("truncated", r"model\.safetensors: truncated safetensors header"),
        ("list", r"model\.safetensors: safetensors header must be a JSON object"),
        ("no-dtype", r"model\.safetensors: tensor 'model\.embed_tokens\.weight': header entry has no 'dtype'"),
        ("entry-list", r"model\.safetensors: tensor 'model\.embed_tokens\.weight': header entry must be an object"),
        ("negative-offset", r"model\.safetensors: tensor 'model\.embed_tokens\.weight': data_offsets \[-8, .*0 <= start"),
        ("offset-past-end", r"model\.safetensors: tensor 'model\.embed_tokens\.weight': data_offsets .* <= end <="),
        ("bad-shape", r"model\.safetensors: tensor 'model\.embed_tokens\.weight': shape must be a list of non-negative ints"),
        ("int-dtype", r"tensor 'model\.embed_tokens\.weight' has dtype I32; expected a float dtype"),
    ],
)
def test_malformed_header_is_a_clear_error_naming_the_file(tmp_path, case, pattern):
    ckpt = _single(tmp_path)
    header, data = _header(ckpt)
    entry = header["model.embed_tokens.weight"]
    if case == "not-json":
        blob = b"{not json" + b" " * 10
    elif case == "truncated":
        blob = json.dumps(header).encode()
        with open(ckpt / "model.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(blob) + 1000) + blob[:50])
        blob = None
    elif case == "list":
        blob = json.dumps([1, 2, 3]).encode()
    else:
        if case == "no-dtype":
            del entry["dtype"]
        elif case == "entry-list":
            header["model.embed_tokens.weight"] = [entry["dtype"], entry["shape"]]
        elif case == "negative-offset":
            entry["data_offsets"] = [-8, entry["data_offsets"][1]]
        elif case == "offset-past-end":
            entry["data_offsets"] = [0, len(data) + 4]
        elif case == "bad-shape":
            entry["shape"] = [-1, 16]
        elif case == "int-dtype":
            entry["dtype"] = "I32"
        blob = json.dumps(header).encode()
    if blob is not None:
        _raw_safetensors(ckpt / "model.safetensors", blob, data)
    with pytest.raises(ValueError, match=pattern):
        from_pretrained(ckpt, progress=False, tokenizer=False)


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("{broken", r"model\.safetensors\.index\.json: the shard index is not valid JSON"),
        ('["a", "b"]', r"model\.safetensors\.index\.json: a shard index must be a JSON object"),
        ('{"weight_map": {"a": 3}}', r"model\.safetensors\.index\.json: a shard index must be a JSON object whose 'weight_map'"),
        ('{"weight_map": []}', r"model\.safetensors\.index\.json: a shard index must be a JSON object whose 'weight_map'"),
    ],
)
def test_bad_index_is_a_clear_error_naming_the_file(sharded, tmp_path, content, pattern):
    ckpt = _copy_dir(sharded, tmp_path / "ckpt")
    (ckpt / "model.safetensors.index.json").write_text(content)
    with pytest.raises(ValueError, match=pattern):
        from_pretrained(ckpt, progress=False, tokenizer=False)


def test_config_json_that_is_not_json_names_the_file(tmp_path):
    ckpt = _single(tmp_path)
    (ckpt / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"config\.json: config\.json is not valid JSON"):
        from_pretrained(ckpt, progress=False, tokenizer=False)


# ----------------------------------------------------------------------------- float64
def test_float64_checkpoint_loads_as_float32(tmp_path):
    """A float64 checkpoint is converted to float32 while it is read (the ops have no float64 kernels);
    asking for float64 explicitly is a TypeError naming dtype."""
    model = _model()
    ckpt = tmp_path / "ckpt"
    save_pretrained(model, str(ckpt))
    sd = load_file(ckpt / "model.safetensors")
    save_file({k: v.double() for k, v in sd.items()}, ckpt / "model.safetensors")
    loaded = from_pretrained(ckpt, progress=False, tokenizer=False)
    assert loaded.dtype == torch.float32 and loaded.weights.embed.dtype == torch.float32
    assert torch.equal(loaded.weights.embed, model.weights.embed)
    ids = torch.randint(0, 37, (1, 5))
    assert torch.equal(loaded.forward(ids), model.forward(ids))
    with pytest.raises(TypeError, match="dtype must be torch.float32, torch.bfloat16 or torch.float16"):
        from_pretrained(ckpt, dtype=torch.float64, progress=False, tokenizer=False)


def test_generation_config_eos_must_be_ints(tmp_path):
    """A string eos_token_id in generation_config.json used to become the digits' ids ("12" -> [1, 2])."""
    ckpt = _single(tmp_path)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": "12"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id"):
        from_pretrained(ckpt, progress=False, tokenizer=False)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert from_pretrained(ckpt, progress=False, tokenizer=False).generation_defaults["eos_token_id"] == [5, 7]
