# Sourced by the GPU session scripts: where the CUDA libraries and headers are on the GPU
# machine. Sets GLD (the LD_LIBRARY_PATH for gram's processes only: cudarc dlopens libcuda from
# the driver, NVRTC and cuBLAS from the toolkit or the pip wheels; torch brings its own) and
# exports GRAM_CUDA_INCLUDE (cuda_bf16.h for NVRTC) where found.
libdirs=$(find /usr/local/cuda/ /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu /opt /usr/local/lib \
  \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' -o -name 'libcublasLt.so*' -o -name 'libcuda.so*' \) \
  -printf '%h\n' 2>/dev/null | grep -v -E 'stubs|compat' | sort -u | tr '\n' ':')
GLD="${libdirs}${LD_LIBRARY_PATH:-}"
inc=$(find /usr/local/cuda/include /usr/local/cuda*/include /opt -name cuda_bf16.h -printf '%h\n' 2>/dev/null | head -1)
if [ -n "$inc" ]; then export GRAM_CUDA_INCLUDE="$inc"; fi
