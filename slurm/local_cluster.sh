#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine: munged, MariaDB, slurmdbd, slurmctld, slurmd, as root,
# without systemd. `up` installs the Debian packages if needed and starts what is not running (idempotent);
# `down` cancels every job, then stops each daemon by the pid recorded when it was started; `status`.
# State, logs and pids live in $RECIPEBOX_SLURM_DIR (default /var/tmp/recipebox-slurm).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
DIR=${RECIPEBOX_SLURM_DIR:-/var/tmp/recipebox-slurm}
DIR=${DIR%"${DIR##*[!/]}"} # no trailing slashes: they would make the link check below follow the link
DBPORT=${RECIPEBOX_SLURM_DB_PORT:-3307}
HOST=$(hostname -s)
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARK="# recipebox local cluster"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd) # start order; stopped in reverse

say() { echo "local_cluster: $*" >&2; }
die() {
  say "error: $*"
  exit 1
}

pid_of() { cat "$DIR/pids/$1" 2>/dev/null || true; }

# Alive and still the program we started (a recycled pid is someone else's).
alive() {
  local pid
  pid=$(pid_of "$1")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ]
}

wait_for() { # seconds, description, command...
  local limit=$1 what=$2
  shift 2
  for _ in $(seq $((limit * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what did not happen within ${limit}s; see the logs in $DIR/log"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

install_packages() {
  local missing=()
  for bin in slurmctld slurmd sbatch munged slurmdbd mariadbd sacct; do
    command -v "$bin" >/dev/null || missing+=("$bin")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; run as root so apt-get can install ${PACKAGES[*]}"
  say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
  # Package scripts would start the daemons with Debian's default configs; keep them from doing so.
  local policy=/usr/sbin/policy-rc.d added=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  [ -n "$added" ] && rm -f "$policy"
  return 0
}

render() { # template, destination[, umask]
  local topology text pass
  topology=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //')
  text=$(sed -e "s|@HOST@|$HOST|g" -e "s|@DIR@|$DIR|g" -e "s|@DBPORT@|$DBPORT|g" \
    -e "s|@TOPOLOGY@|$topology|g" "$1")
  pass=$(<"$DIR/db.password")
  text=${text//@DBPASS@/"$pass"} # in the shell: no command line shows the password
  (umask "${3:-022}" && printf '%s\n' "$text" >"$2.tmp")
  mv "$2.tmp" "$2"
}

# The folder root writes, locks and starts daemons from: refused if another user made it first (in a shared
# /var/tmp they could plant links, pid files or a MariaDB config there).
own_dir() {
  [ -n "$DIR" ] || die "RECIPEBOX_SLURM_DIR may not be /; give a folder of its own"
  mkdir -p "$DIR"
  [ ! -L "$DIR" ] && [ "$(stat -c %u "$DIR")" -eq 0 ] ||
    die "$DIR is a link or belongs to another user (uid $(stat -c %u "$DIR")); remove it, or set RECIPEBOX_SLURM_DIR to a folder of root's"
}

write_configs() {
  mkdir -p "$DIR"/{pids,run,log,state/slurmctld,state/slurmd,mysql} /etc/slurm
  chmod 755 "$DIR"
  [ -s "$DIR/db.password" ] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DIR/db.password")
  for f in "$CONF" "$DBD_CONF"; do
    if [ -e "$f" ] && ! grep -q "^$MARK" "$f"; then
      die "$f exists and was not written by this script; move it away to use the local cluster"
    fi
  done
  render "$here/local/slurm.conf.in" "$CONF"
  render "$here/local/slurmdbd.conf.in" "$DBD_CONF" 077 # it holds the database password
  chmod 600 "$DBD_CONF"
  render "$here/local/my.cnf.in" "$DIR/my.cnf"
  getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts # torch's MASTER_ADDR
}

start() { # name, command... (runs in the background; its pid is recorded)
  local name=$1
  shift
  "$@" >>"$DIR/log/$name.out" 2>&1 </dev/null 9>&- & # fd 9 holds our lock; daemons must not keep it
  echo $! >"$DIR/pids/$name"
  disown
}

start_munged() {
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge && head -c 1024 /dev/urandom >/etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  # munged refuses to run as root with the key; setpriv execs it (so $! is munged itself).
  start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground --force
  wait_for 20 "munged answering" bash -c 'munge -n | unmunge'
}

start_mariadbd() {
  chown -R mysql:mysql "$DIR/mysql"
  local fresh=""
  if [ ! -d "$DIR/mysql/data/mysql" ]; then
    mariadb-install-db --defaults-file="$DIR/my.cnf" --skip-test-db >>"$DIR/log/mariadb-install.out" 2>&1 ||
      die "mariadb-install-db failed; see $DIR/log/mariadb-install.out"
    fresh=1
  fi
  start mariadbd /usr/sbin/mariadbd --defaults-file="$DIR/my.cnf"
  wait_for 60 "MariaDB accepting connections" mariadb --socket="$DIR/mysql/mysqld.sock" -e "select 1"
  if [ -n "$fresh" ]; then
    mariadb --socket="$DIR/mysql/mysqld.sock" <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$DIR/db.password")';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
SQL
  fi
}

start_slurmdbd() {
  start slurmdbd slurmdbd -D
  wait_for 60 "slurmdbd listening on 6819" port_open 6819
  if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx recipebox; then
    sacctmgr -i add cluster recipebox >/dev/null
  fi
}

start_slurmctld() {
  start slurmctld slurmctld -D -i
  wait_for 30 "slurmctld answering" scontrol ping
}

start_slurmd() {
  start slurmd slurmd -D
}

node_ready() {
  local state
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1)
  case "$state" in idle | mixed | allocated | completing) return 0 ;; esac
  # A node left drained or down by an earlier crash comes back on its own terms.
  case "$state" in drain* | down* | fail*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 ;; esac
  return 1
}

cmd_up() {
  [ "$(id -u)" -eq 0 ] || die "the local cluster runs as root; run: sudo bash $0 up"
  install_packages
  own_dir
  exec 9>"$DIR/lock"
  flock 9
  write_configs
  local cold=1
  { alive slurmctld || alive slurmd; } && cold=0
  for d in "${DAEMONS[@]}"; do
    alive "$d" || "start_$d"
  done
  if [ "$cold" -eq 1 ]; then
    # The daemons died without `down` (a crash, a machine restart): the jobs slurmctld recovers from its
    # state have no processes left, yet would hold the node until their time limit. End them.
    local stale
    stale=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${stale// /}" ]; then
      # shellcheck disable=SC2086
      scancel $stale 2>/dev/null || true
      say "cancelled jobs left from before the daemons stopped: $stale"
    fi
  fi
  wait_for 60 "node $HOST idle in sinfo" node_ready
  say "up: partition local, node $HOST ($(sinfo -h -o '%c CPUs')), logs in $DIR/log"
}

stop_daemon() {
  local name=$1 pid
  pid=$(pid_of "$name")
  if alive "$name"; then
    kill -TERM "$pid"
    for _ in $(seq 100); do
      alive "$name" || break
      sleep 0.2
    done
    alive "$name" && kill -KILL "$pid"
  fi
  rm -f "$DIR/pids/$name"
}

cmd_down() {
  [ -d "$DIR" ] || return 0
  own_dir
  exec 9>"$DIR/lock"
  flock 9
  # Job steps outlive slurmd: end the jobs while slurmctld and slurmd can still deliver the kill.
  if alive slurmctld && alive slurmd; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 150); do
        [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
        sleep 0.2
      done
    fi
  fi
  local i
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    stop_daemon "${DAEMONS[i]}"
  done
  say "down"
}

cmd_status() {
  local rc=0
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then echo "$d running (pid $(pid_of "$d"))"; else
      echo "$d stopped"
      rc=1
    fi
  done
  [ $rc -eq 0 ] && sinfo
  return $rc
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
*)
  echo "usage: $0 up|down|status" >&2
  exit 2
  ;;
esac
