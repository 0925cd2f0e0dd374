#!/bin/sh
# Makes matplotlib importable by python3 (the bench's plots): pip first, then pip for the user
# on a system Python that refuses global installs, then Debian's package.
python3 -c 'import matplotlib' 2>/dev/null && exit 0
pip="python3 -m pip install -q --disable-pip-version-check"
$pip matplotlib 2>/dev/null && exit 0
$pip --user --break-system-packages matplotlib 2>/dev/null && exit 0
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-matplotlib
python3 -c 'import matplotlib'
