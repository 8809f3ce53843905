"""The dtype names a node may ask its engine for; torch-free, so the node's configuration can check them."""

DTYPES = ("auto", "float32", "bfloat16", "float16")
