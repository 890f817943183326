"""One module per op: the public function, its input checks, and dispatch to C++ / Triton / reference."""
