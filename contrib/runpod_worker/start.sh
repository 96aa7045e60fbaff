#!/usr/bin/env bash
# The worker's entrypoint: worker-comfyui's start-up checks, then gpubridge's handler (which starts ComfyUI
# itself, once per worker, and watches it). Kept in step with worker-comfyui's src/start.sh:
#   - SSH when PUBLIC_KEY is set (remote access to a worker, as in the base image);
#   - libtcmalloc preloaded for ComfyUI's memory use;
#   - the GPU pre-flight: a worker whose GPU CUDA cannot initialise exits at once (RunPod replaces it)
#     instead of taking jobs it can only fail; GPUBRIDGE_SKIP_GPU_CHECK=1 skips it (CPU tests);
#   - ComfyUI-Manager in offline network mode when the image has it.
# SERVE_API_LOCALLY=true serves the RunPod test API on 0.0.0.0 instead of taking jobs from RunPod.
set -u

if [ -n "${PUBLIC_KEY:-}" ]; then
    mkdir -p ~/.ssh && echo "$PUBLIC_KEY" > ~/.ssh/authorized_keys
    chmod 700 ~/.ssh && chmod 600 ~/.ssh/authorized_keys
    for key_type in rsa ecdsa ed25519; do
        key_file="/etc/ssh/ssh_host_${key_type}_key"
        [ -f "$key_file" ] || ssh-keygen -t "$key_type" -f "$key_file" -q -N ''
    done
    service ssh start && echo "gpubridge-worker: SSH server started" \
        || echo "gpubridge-worker: SSH server could not be started" >&2
fi

TCMALLOC="$(ldconfig -p 2>/dev/null | grep -Po "libtcmalloc.so.\d" | head -n 1)"
if [ -n "$TCMALLOC" ]; then
    export LD_PRELOAD="$TCMALLOC"
fi

if [ "${GPUBRIDGE_SKIP_GPU_CHECK:-0}" != "1" ]; then
    echo "gpubridge-worker: checking the GPU"
    if ! GPU_CHECK=$(python3 -c "
import torch
try:
    torch.cuda.init()
    print(f'OK: {torch.cuda.get_device_name(0)}')
except Exception as e:
    print(f'FAIL: {e}')
    raise SystemExit(1)
" 2>&1); then
        echo "gpubridge-worker: the GPU is not available; PyTorch could not initialise CUDA:" >&2
        echo "gpubridge-worker: $GPU_CHECK" >&2
        echo "gpubridge-worker: this machine's GPU is not usable; report the machine to RunPod support." >&2
        exit 1
    fi
    echo "gpubridge-worker: GPU available: $GPU_CHECK"
fi

if command -v comfy-manager-set-mode >/dev/null 2>&1; then
    comfy-manager-set-mode offline || echo "gpubridge-worker: could not set ComfyUI-Manager's network_mode" >&2
fi

if [ "${SERVE_API_LOCALLY:-}" = "true" ]; then
    exec python -u /handler.py --rp_serve_api --rp_api_host=0.0.0.0 "$@"
fi
exec python -u /handler.py "$@"
