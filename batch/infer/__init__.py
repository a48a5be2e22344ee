"""One question through one loaded model: media, prompt, ViT, chunked prefill, decode, sampling."""
