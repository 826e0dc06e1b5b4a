# Sourced by scripts/test.sh and scripts/demo.sh: sets PY to a Python that can take
# this project's packages.  A python3 whose pip may install (pyenv, a venv, ...) is used
# as it is; Debian's own python3 is "externally managed" (PEP 668), so then a venv in
# .venv is made over it (without Debian's site packages: its pytest and pluggy are too
# old for current plugins; those packages only serve the guest root).
if python3 -c 'import pip, sys, sysconfig, os
stdlib = sysconfig.get_paths()["stdlib"]
sys.exit(1 if os.path.exists(os.path.join(stdlib, "EXTERNALLY-MANAGED")) and sys.prefix == sys.base_prefix else 0)' 2>/dev/null
then
    PY=python3
else
    [ -x .venv/bin/python3 ] || python3 -m venv .venv
    PY=.venv/bin/python3
fi
echo "python: $($PY -c 'import sys; print(sys.executable, sys.version.split()[0])')"
