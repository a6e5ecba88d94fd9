#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 that runs (the project needs jax 0.12), or says on stderr
# what to install and exits 1. Each candidate is probed by running it: pyenv's python3.13 and
# python3.12 shims exist on PATH but fail unless a version is selected, so after PATH's
# python3.13, python3.12 and python3, pyenv's own installed versions are tried, newest first.
probe() { "$1" -c 'import sys; assert sys.version_info >= (3, 12)' > /dev/null 2>&1; }
for name in python3.13 python3.12 python3; do
  path=$(command -v "$name" 2> /dev/null) && probe "$path" && { echo "$path"; exit 0; }
done
root=$(pyenv root 2> /dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for path in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2> /dev/null | sort -r -V); do
  probe "$path" && { echo "$path"; exit 0; }
done
echo "mermed-jax needs Python 3.12 or newer and found none: install python3.13 (e.g. 'pyenv install 3.13' or your distribution's python3.13 package), or run make PYTHON=/path/to/python3.13" >&2
exit 1
