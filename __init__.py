"""ComfyUI entry point of the UniFusion node pack (ComfyUI imports this folder as a package)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# Served by ComfyUI at /extensions/<this folder's name>/; web/docs/<node id>.md are the nodes'
# help pages, which the frontend shows in its node docs panel.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
