#!/usr/bin/env bash
# Install reelqueue as systemd services on this machine: the units (with your paths),
# the `reelqueue` user, /etc/reelqueue/{config.toml,env} and the state and watch
# folders. Safe to run again: units are rewritten, an existing config, env file, user
# or folder is kept as it is.
#
# Usage: sudo scripts/install-systemd.sh [options]
#   --prefix DIR        reelqueue's install folder, with the docs (default: this repository)
#   --venv DIR          its virtual environment (default: PREFIX/.venv)
#   --state-dir DIR     job directories and the embedded Redis (default: /var/lib/reelqueue)
#   --watch DIR         a drop folder; repeat for several (default: /srv/reelqueue/inbox)
#   --with-redis        also install reelqueue-redis.service (a system redis-server with
#                       AOF) and point a newly created config at it
#   --redis-server PATH with --with-redis, the redis-server to run (default: on PATH)
#   --root DIR          install into a staging root: no user, no chown, no systemctl
#   --dry-run           print what would be done, change nothing
#   -h, --help          this text
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UNIT_SOURCE="$REPO/systemd"
SERVICE_USER=reelqueue
# The paths the unit files in systemd/ are written with; replaced by the chosen ones.
DEFAULT_PREFIX=/opt/reelqueue
DEFAULT_STATE=/var/lib/reelqueue
DEFAULT_WATCH=/srv/reelqueue/inbox
DEFAULT_REDIS_SERVER=/usr/bin/redis-server
REDIS_SOCKET=/run/reelqueue-redis/redis.sock

PREFIX=$REPO
VENV=""
STATE=$DEFAULT_STATE
WATCHES=()
WITH_REDIS=0
REDIS_SERVER=""
ROOT=""
DRY_RUN=0

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

die() {
    printf 'install-systemd: %s\n' "$*" >&2
    exit 1
}

note() {
    printf '%s\n' "$*"
}

# Paths end up in unit files (space-separated lists, sed replacements) and in TOML
# strings: keep to characters that need no quoting anywhere.
check_path() {
    local option=$1 path=$2
    [[ $path == /* ]] || die "$option needs an absolute path, got '$path'"
    [[ $path =~ ^/[A-Za-z0-9._/@+-]*$ ]] ||
        die "$option '$path': use letters, digits and . _ / @ + - only (no spaces or quotes)"
}

parse_args() {
    while (($#)); do
        case $1 in
            --prefix) PREFIX=${2:?--prefix needs a folder}; shift ;;
            --venv) VENV=${2:?--venv needs a folder}; shift ;;
            --state-dir) STATE=${2:?--state-dir needs a folder}; shift ;;
            --watch) WATCHES+=("${2:?--watch needs a folder}"); shift ;;
            --with-redis) WITH_REDIS=1 ;;
            --redis-server) REDIS_SERVER=${2:?--redis-server needs a path}; shift ;;
            --root) ROOT=${2:?--root needs a folder}; shift ;;
            --dry-run) DRY_RUN=1 ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; printf '\nunknown option: %s\n' "$1" >&2; exit 2 ;;
        esac
        shift
    done
    PREFIX=${PREFIX%/}
    VENV=${VENV:-$PREFIX/.venv}
    STATE=${STATE%/}
    ((${#WATCHES[@]})) || WATCHES=("$DEFAULT_WATCH")
    if ((WITH_REDIS)) && [[ -z $REDIS_SERVER ]]; then
        REDIS_SERVER=$(command -v redis-server || true)
        [[ -n $REDIS_SERVER ]] || die "--with-redis: no redis-server on PATH; install it" \
            "(apt-get install redis-server) or name one with --redis-server PATH"
    fi
    check_path --prefix "$PREFIX"
    check_path --venv "$VENV"
    check_path --state-dir "$STATE"
    local watch
    for watch in "${WATCHES[@]}"; do check_path --watch "$watch"; done
    if ((WITH_REDIS)); then check_path --redis-server "$REDIS_SERVER"; fi
    if [[ -n $ROOT ]]; then
        check_path --root "$ROOT"
        ROOT=${ROOT%/}
    fi
}

check_environment() {
    [[ -x $VENV/bin/reelqueue && -x $VENV/bin/python ]] ||
        die "no reelqueue in $VENV: run \`make\` in $PREFIX (or python3 -m venv $VENV &&" \
            "$VENV/bin/pip install $PREFIX), or point --prefix/--venv at the install"
    if ((WITH_REDIS)); then
        [[ -x $REDIS_SERVER ]] || die "--redis-server $REDIS_SERVER is not an executable file"
    fi
    if [[ -z $ROOT ]] && ((!DRY_RUN)) && ((EUID != 0)); then
        die "run as root (sudo $0 …), or try it first with --dry-run or --root DIR"
    fi
}

# --- doing, or saying what would be done ----------------------------------------------

run() {
    if ((DRY_RUN)); then
        note "would run: $*"
    else
        note "+ $*"
        "$@"
    fi
}

# chown only on a real install: in a staging root the user may not exist.
set_owner() {
    local owner=$1 path=$2
    if [[ -z $ROOT ]]; then run chown "$owner" "$path"; fi
}

ensure_dir() {
    local dir=$1 mode=$2 owner=$3
    if [[ -d $ROOT$dir ]]; then
        note "kept $dir (exists)"
        return
    fi
    run mkdir -p "$ROOT$dir"
    run chmod "$mode" "$ROOT$dir"
    set_owner "$owner" "$ROOT$dir"
}

# Write stdin to a file, atomically, unless it already holds exactly that.
write_file() {
    local dest=$1 mode=$2 owner=$3 content
    content=$(cat)
    if [[ -f $ROOT$dest ]] && [[ $(cat "$ROOT$dest") == "$content" ]]; then
        note "unchanged $dest"
        return
    fi
    if ((DRY_RUN)); then
        note "would write $dest (mode $mode, owner $owner)"
        return
    fi
    mkdir -p "$(dirname "$ROOT$dest")"
    local tmp
    tmp=$(mktemp "$ROOT$dest.XXXXXX")
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    set_owner "$owner" "$tmp" >/dev/null
    mv -f "$tmp" "$ROOT$dest"
    note "wrote $dest"
}

# Write stdin to a file only if there is none: the operator's edits are kept.
write_if_missing() {
    local dest=$1
    if [[ -e $ROOT$dest ]]; then
        cat >/dev/null
        note "kept $dest (exists)"
        return
    fi
    write_file "$@"
}

# --- what is installed ----------------------------------------------------------------

ensure_user() {
    if [[ -n $ROOT ]]; then
        note "skipped: user $SERVICE_USER (not created in a staging root)"
    elif getent passwd "$SERVICE_USER" >/dev/null; then
        note "kept user $SERVICE_USER (exists)"
    else
        run useradd --system --user-group --home-dir "$STATE" --no-create-home \
            --shell /usr/sbin/nologin --comment "reelqueue daemon" "$SERVICE_USER"
    fi
}

ensure_folders() {
    ensure_dir /etc/reelqueue 0750 "root:$SERVICE_USER"
    ensure_dir "$STATE" 0750 "$SERVICE_USER:$SERVICE_USER"
    # setgid and group-writable: members of the reelqueue group drop files here; sticky:
    # only a file's owner (or the service) may rename or remove it, so nobody replaces
    # another's request, or done/ and failed/, with a link.
    local watch
    for watch in "${WATCHES[@]}"; do
        ensure_dir "$watch" 3775 "$SERVICE_USER:$SERVICE_USER"
    done
}

# A state folder used before (`reelqueue up` as another user) keeps that user's files,
# which the service cannot write: say so rather than chown a large tree unasked.
warn_foreign_files() {
    [[ -z $ROOT && -d $STATE ]] || return 0
    getent passwd "$SERVICE_USER" >/dev/null || return 0
    if [[ -n $(find "$STATE" ! -user "$SERVICE_USER" -print -quit) ]]; then
        note "note: some files in $STATE are not owned by $SERVICE_USER (an earlier run as" \
            "another user?); fix with: chown -R $SERVICE_USER: $STATE"
    fi
}

# The documented config.toml, with this machine's folders (and Redis) filled in.
config_text() {
    local redis_url=""
    if ((WITH_REDIS)); then redis_url="unix://$REDIS_SOCKET"; fi
    awk -v state="$STATE" -v watch="${WATCHES[0]}" -v redis_url="$redis_url" '
        /^\[/ { section = $0 }
        section == "[state]" && /^dir = / { print "dir = \"" state "\""; next }
        section == "[redis]" && /^url = / && redis_url != "" {
            print "url = \"" redis_url "\""; next
        }
        section == "[[intake.folder]]" && /^path = / && !folder_set {
            print "path = \"" watch "\""; folder_set = 1; next
        }
        { print }
    ' "$REPO/config.toml"
    local watch
    for watch in "${WATCHES[@]:1}"; do
        printf '\n[[intake.folder]]\npath = "%s"\n' "$watch"
    done
}

env_text() {
    local token
    token=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
    cat <<EOF
# Secrets for reelqueue's services: systemd reads this file (as root) and passes it to
# reelqueue-daemon and the workers. Keep it mode 600.
# The HTTP API's admin token ([[intake.http.tokens]] token = "env:REELQUEUE_TOKEN"):
REELQUEUE_TOKEN=$token
# The Telegram bot's token, once [intake.chat] is enabled:
# REELQUEUE_TELEGRAM_TOKEN=
EOF
}

redis_conf_text() {
    cat <<EOF
# Redis for reelqueue (reelqueue-redis.service). Written once by install-systemd.sh;
# your edits are kept.
# Unix socket only; config: [redis] url = "unix://$REDIS_SOCKET"
port 0
unixsocket $REDIS_SOCKET
unixsocketperm 770
# The data lives in StateDirectory=reelqueue-redis of the unit.
dir /var/lib/reelqueue-redis
appendonly yes
appendfsync everysec
# arq's queue and job keys must never be evicted to make room.
maxmemory-policy noeviction
# Logs go to the journal.
logfile ""
# Several machines: serve TCP with a password, and set on every machine
# [redis] url = "redis://:PASSWORD@THIS-HOST:6379/0"
# port 6379
# bind 0.0.0.0
# requirepass PASSWORD
EOF
}

unit_text() {
    local watches
    watches=$(printf '%s ' "${WATCHES[@]}")
    # Two passes: the defaults become {MARKERS} first, so that a chosen path which
    # contains a default (a prefix under /srv/opt/reelqueue…) is not replaced again.
    sed -e "s#^ReadWritePaths=$DEFAULT_WATCH\$#ReadWritePaths={WATCHES}#" \
        -e "s#$DEFAULT_PREFIX/.venv/bin/#{VENV}/bin/#g" \
        -e "s#$DEFAULT_PREFIX#{PREFIX}#g" \
        -e "s#$DEFAULT_STATE#{STATE}#g" \
        -e "s#$DEFAULT_REDIS_SERVER #{REDIS_SERVER} #g" \
        "$UNIT_SOURCE/$1" |
        sed -e "s#{WATCHES}#${watches% }#g" \
            -e "s#{VENV}#$VENV#g" \
            -e "s#{PREFIX}#$PREFIX#g" \
            -e "s#{STATE}#$STATE#g" \
            -e "s#{REDIS_SERVER}#${REDIS_SERVER:-$DEFAULT_REDIS_SERVER}#g"
}

install_units() {
    local units=(reelqueue.target reelqueue-daemon.service reelqueue-worker@.service)
    if ((WITH_REDIS)); then units+=(reelqueue-redis.service); fi
    local unit
    for unit in "${units[@]}"; do
        unit_text "$unit" | write_file "/etc/systemd/system/$unit" 0644 root:root
    done
}

reload_systemd() {
    if [[ -n $ROOT ]]; then
        note "skipped: systemctl daemon-reload (staging root)"
    elif [[ ! -d /run/systemd/system ]]; then
        note "skipped: systemctl daemon-reload (systemd is not running here)"
    else
        run systemctl daemon-reload
    fi
}

gpu_count() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

print_next_steps() {
    local gpus seen workers="reelqueue-worker@0.service" redis=""
    gpus=$(gpu_count)
    seen="$gpus GPUs seen here"
    if ((gpus == 0)); then seen="no GPU seen here: worker@0 runs jobs on the CPU"; fi
    if ((gpus == 1)); then seen="1 GPU seen here"; fi
    if ((gpus > 1)); then workers="reelqueue-worker@{0..$((gpus - 1))}.service"; fi
    if ((WITH_REDIS)); then redis="reelqueue-redis.service "; fi
    cat <<EOF

Next:
  1. Review /etc/reelqueue/config.toml; secrets (tokens) go in /etc/reelqueue/env.
  2. Check the machine as the service user, with its secrets:
       systemd-run --pipe --wait --quiet -p User=$SERVICE_USER \\
         -p EnvironmentFile=/etc/reelqueue/env -E REELQUEUE_CONFIG=/etc/reelqueue/config.toml \\
         $VENV/bin/reelqueue doctor
  3. Start everything now and at boot, one worker per GPU ($seen):
       systemctl enable --now reelqueue.target ${redis}reelqueue-daemon.service $workers
  4. Follow the logs: journalctl -u reelqueue-daemon -u 'reelqueue-worker@*' -f -o cat
EOF
}

main() {
    parse_args "$@"
    check_environment
    if ((DRY_RUN)); then note "dry run: nothing is changed"; fi
    ensure_user
    ensure_folders
    warn_foreign_files
    config_text | write_if_missing /etc/reelqueue/config.toml 0640 "root:$SERVICE_USER"
    env_text | write_if_missing /etc/reelqueue/env 0600 root:root
    if ((WITH_REDIS)); then
        redis_conf_text | write_if_missing /etc/reelqueue/redis.conf 0640 "root:$SERVICE_USER"
    fi
    install_units
    reload_systemd
    print_next_steps
}

main "$@"
