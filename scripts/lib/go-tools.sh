# Shared by scripts/kube-assets, scripts/istiod and scripts/clientgo-informers: build the Go
# programs of one wrapper module under tools/ with plain `go build`, once per machine, and cache
# them. The cache key is the wrapper's go.mod, go.sum and Go sources plus the Go version and the
# ldflags, so a changed pin builds anew and an unchanged one is reused. Progress goes to stderr.
#
#   go_tools_build WRAPPER TAGS LDFLAGS OUT=PACKAGE [OUT=PACKAGE ...]
#
# prints the folder holding every OUT.

# shellcheck shell=bash
_go_tools_say() { echo "${0##*/}: $*" >&2; }
_go_tools_die() { _go_tools_say "$*"; exit 1; }

go_tools_build() {
  local wrapper=$1 tags=$2 ldflags=$3
  shift 3
  local top
  top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  local src=$top/tools/$wrapper
  [ -f "$src/go.mod" ] && [ -f "$src/go.sum" ] || _go_tools_die "$src has no go.mod and go.sum"
  command -v go >/dev/null || _go_tools_die "go is not installed (Go 1.26 or newer is needed)"
  # The machine's own Go builds; a go.mod naming a newer one must not fetch a toolchain silently.
  export GOTOOLCHAIN=local CGO_ENABLED=0
  local gover key
  gover=$(go env GOVERSION)
  key=$( (cd "$src" && cat go.mod go.sum ./*.go 2>/dev/null; echo "$gover $tags $ldflags $*") |
    sha256sum | cut -c1-16)
  local cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/apiproxy/go-tools/$wrapper
  local out=$cache_root/$key
  local spec missing=0
  for spec in "$@"; do [ -x "$out/${spec%%=*}" ] || missing=1; done
  if [ "$missing" = 0 ]; then echo "$out"; return 0; fi
  mkdir -p "$cache_root"
  # One build at a time per wrapper: parallel test runs and engineers may ask at once.
  exec 8>"$cache_root/.lock"
  flock 8
  missing=0
  for spec in "$@"; do [ -x "$out/${spec%%=*}" ] || missing=1; done
  if [ "$missing" = 0 ]; then exec 8>&-; echo "$out"; return 0; fi
  local work
  work=$(mktemp -d "$cache_root/build.XXXXXX")
  _go_tools_say "building ${*%%=*} from tools/$wrapper with $gover (once per machine; minutes)"
  local started=$SECONDS
  for spec in "$@"; do
    # -mod=readonly: the committed go.sum is the lock; a missing or changed sum fails the build.
    (cd "$src" && GOFLAGS="-mod=readonly -buildvcs=false" \
      go build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" \
      -o "$work/${spec%%=*}" "${spec#*=}") >"$work/build.log" 2>&1 ||
      { tail -40 "$work/build.log" >&2; rm -rf "$work"; _go_tools_die "go build ${spec#*=} failed (log above)"; }
  done
  rm -f "$work/build.log"
  rm -rf "$out"
  mv "$work" "$out"
  exec 8>&-
  _go_tools_say "built in $((SECONDS - started)) s, cached in $out"
  echo "$out"
}
