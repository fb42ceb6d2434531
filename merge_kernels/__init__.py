"""tureen's merge engine: recipes, merge methods, checkpoint IO and the streaming runner."""

import os

# Merging allocates many tensors of tens of megabytes. Backing them with transparent huge
# pages (PyTorch reads this variable once, before its first CPU allocation) makes their
# page faults several times cheaper; it changes no result. Set only if the user has not.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
