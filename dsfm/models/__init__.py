"""Models: MPP's Axial ViT (avit.py) and its layers (layers.py)."""
