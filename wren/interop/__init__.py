"""Getting models in from elsewhere: MiniMind `.pth` import (`minimind`), hub downloads with
sha256 manifests (`hub`, `checksums`). Optional libraries (huggingface_hub, modelscope) are
imported inside the functions that use them."""
