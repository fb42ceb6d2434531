"""tureen's merge engine: recipes, merge methods, checkpoint IO and the streaming runner."""

import os

# Merging allocates many tensors of tens of megabytes. Backing them with transparent huge
# pages (PyTorch reads this variable once, before its first CPU allocation) makes their
# page faults several times cheaper; it changes no result. Set only if the user has not.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# Kernels run many short parallel regions on cache-sized blocks. OpenMP's default is to
# spin between regions, which on a busy machine stalls each region for a scheduler slice;
# sleeping instead keeps them fast. Read by OpenMP when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
