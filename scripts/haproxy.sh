#!/usr/bin/env bash
# HAProxy for the cluster tests (SPEC §12): each test runs its own private HAProxy as a child
# process (tests/support/cluster.rs, config derived from contrib/haproxy.cfg, loopback ports
# only); this script only makes sure the binary is there and tells the tests where.
#
# Meant to be sourced (by scripts/test); it does not change shell options, so it works with or
# without `set -euo pipefail` in the caller.
#
#   haproxy_install   install the Debian package haproxy if it is missing (needs root); the
#                     system service it brings is never started or used
#   haproxy_check     check the binary and its version (>= 2.2: contrib/haproxy.cfg's health
#                     checks), export BOSHMUX_TEST_HAPROXY with its path
#
# BOSHMUX_TEST_HAPROXY may be set beforehand to use another binary.

_haproxy_apt_updated=

# The binary: $BOSHMUX_TEST_HAPROXY if set, else haproxy on PATH or in /usr/sbin (not on a
# non-root PATH on Debian).
_haproxy_bin() {
	if [[ -n ${BOSHMUX_TEST_HAPROXY:-} ]]; then
		echo "$BOSHMUX_TEST_HAPROXY"
	elif command -v haproxy >/dev/null; then
		command -v haproxy
	elif [[ -x /usr/sbin/haproxy ]]; then
		echo /usr/sbin/haproxy
	else
		return 1
	fi
}

haproxy_install() {
	_haproxy_bin >/dev/null && return 0
	if ((EUID != 0)); then
		echo "haproxy.sh: haproxy is not installed and we are not root; install the 'haproxy' package" >&2
		return 1
	fi
	if [[ -z $_haproxy_apt_updated ]]; then
		apt-get update -qq || return 1
		_haproxy_apt_updated=1
	fi
	# policy-rc.d forbids starting services: the package's own haproxy must not run.
	local policy=/usr/sbin/policy-rc.d created=
	if [[ ! -e $policy ]]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created=1
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy
	local status=$?
	[[ -n $created ]] && rm -f "$policy"
	((status == 0)) && _haproxy_bin >/dev/null
}

haproxy_check() {
	local bin version major minor
	bin=$(_haproxy_bin) || { echo "haproxy.sh: haproxy not found; call haproxy_install" >&2; return 1; }
	[[ -x $bin ]] || { echo "haproxy.sh: $bin is not executable" >&2; return 1; }
	# First line: "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
	version=$("$bin" -v 2>/dev/null | sed -n '1s/^HA-\{0,1\}Proxy version \([0-9]*\.[0-9]*\).*/\1/p')
	if [[ -z $version ]]; then
		echo "haproxy.sh: cannot read the version of $bin" >&2
		return 1
	fi
	major=${version%%.*}
	minor=${version#*.}
	if ((major < 2 || (major == 2 && minor < 2))); then
		echo "haproxy.sh: $bin is HAProxy $version; the cluster tests need >= 2.2" >&2
		return 1
	fi
	# The operator's config must stay valid for this HAProxy.
	local cfg
	cfg="$(dirname "${BASH_SOURCE[0]}")/../contrib/haproxy.cfg"
	"$bin" -c -q -f "$cfg" || {
		echo "haproxy.sh: contrib/haproxy.cfg does not pass '$bin -c'" >&2
		return 1
	}
	export BOSHMUX_TEST_HAPROXY="$bin"
}
