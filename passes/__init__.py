"""optcc's graph passes, one per file. Each module registers itself on import;
this list is the single place that says which passes exist."""
from optcc.passes import cleanup  # noqa: F401
from optcc.passes import layer_skip  # noqa: F401
from optcc.passes import token_merge  # noqa: F401
from optcc.passes import quantize  # noqa: F401
from optcc.passes import kv_share  # noqa: F401
from optcc.passes import kv_quant  # noqa: F401
from optcc.passes import fuse_attention  # noqa: F401
from optcc.passes import fuse_linears  # noqa: F401
from optcc.passes import precision  # noqa: F401
