"""gpuload: stream safetensors into GPU and CPU memory."""
