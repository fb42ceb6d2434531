"""tureen's merge engine: recipes, merge methods, checkpoint IO and the streaming runner."""

__version__ = "0.1.0"
