"""A procedural toy world and a tiny SD-compatible model trained on it (work in progress).

``world``: deterministic images of shapes with colours, textures, sizes and
positions on plain backgrounds, with captions and held-out combinations.
``checker``: reads the attributes back from an image, for objective scores.
``train``: trains the VAE, then the UNet and text encoder, resumably.
"""
