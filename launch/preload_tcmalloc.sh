# Sourced by the launch scripts and the Makefile: preload TCMalloc when the machine has it.
# XLA:CPU allocates and frees large buffers every step; glibc hands them back to the kernel and
# gets fresh zeroed pages next time (27% of a ViT-S/16 CPU train step, and slower compiles),
# while TCMalloc keeps them for reuse. Debian/Ubuntu: apt-get install libtcmalloc-minimal4.
# MERMED_NO_TCMALLOC=1 leaves LD_PRELOAD alone.
if [[ -z "${MERMED_NO_TCMALLOC:-}" && "${LD_PRELOAD:-}" != *tcmalloc* ]]; then
  for lib in /usr/lib/{x86_64,aarch64}-linux-gnu/libtcmalloc{_minimal,}.so.4; do
    if [[ -f "$lib" ]]; then
      export LD_PRELOAD="$lib${LD_PRELOAD:+ $LD_PRELOAD}"
      break
    fi
  done
fi
