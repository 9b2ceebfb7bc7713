"""ComfyUI nodes of the UniFusion pack: thin wrappers over unifusion_core.

The node classes land with the node-pack issue; until then the pack registers no nodes.
"""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
