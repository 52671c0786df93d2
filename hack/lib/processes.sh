# Process helpers of the local environment's scripts (cluster-up, cluster-node and their
# -down counterparts): one copy, sourced. Each script defines log() first; start_bg needs
# $RUN and $LOGS. Every daemon is known by a pid file and by a flag pointing into the state
# directory, so a recycled pid or another checkout's daemon is never taken for ours.
# shellcheck shell=bash
set -o pipefail

# pid_of FILE NAME: prints the pid in FILE if that process is alive and really is NAME
# (guards against a recycled pid); otherwise removes the stale FILE and prints nothing.
pid_of() {
  local file=$1 name=$2 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file" 2>/dev/null || true)
  if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
     && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -- "$name" >/dev/null; then
    echo "$pid"
  else
    log "removing stale pid file $file"
    rm -f "$file"
  fi
}

# find_ours FILE PATTERN: when FILE is missing, looks for our process by a flag that points
# into the state dir (so only this state dir's process matches), e.g. after the pid file was
# lost, and records it in FILE instead of starting a second copy that could not bind its port.
find_ours() {
  local file=$1 pattern=$2 pid
  pid=$(pgrep -f -- "$pattern" | sed -n 1p || true)
  if [ -n "$pid" ]; then
    log "adopting running process $pid (no pid file)"
    echo "$pid" >"$file"
    echo "$pid"
  fi
}

# port_busy PORT: true when something already listens on 127.0.0.1:PORT.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# running_other_binary PID BINARY: true when PID runs another executable than BINARY (say
# after a KUBE_VERSION switch): such a process is replaced, not adopted.
running_other_binary() {
  [ "$(readlink -f "/proc/$1/exe" 2>/dev/null)" != "$(readlink -f "$2")" ]
}

# stop_pid NAME PID: TERM, wait up to 10 s, then KILL and wait until it is gone.
stop_pid() {
  local name=$1 pid=$2 _
  kill -0 "$pid" 2>/dev/null || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  log "$name did not exit after 10 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

# stop_from_pidfile NAME FILE: stops the pid in FILE if it is alive and really is NAME
# (a recycled pid must not be killed), then removes FILE.
stop_from_pidfile() {
  local name=$1 file=$2 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file" 2>/dev/null || true)
  if [[ "$pid" =~ ^[0-9]+$ ]] \
     && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -- "$name" >/dev/null; then
    stop_pid "$name" "$pid"
  fi
  rm -f "$file"
}

# stop_matching NAME PATTERN: catches our own processes whose pid file was lost. PATTERN
# names a flag pointing into the state dir, so only this state dir's processes match.
stop_matching() {
  local name=$1 pattern=$2 pid
  for pid in $(pgrep -f -- "$pattern" || true); do
    stop_pid "$name" "$pid"
  done
}

# wait_for TIMEOUT PID CHECK...: polls CHECK until it succeeds; fails early if PID dies.
wait_for() {
  local timeout=$1 pid=$2; shift 2
  local deadline=$((SECONDS + timeout))
  while [ "$SECONDS" -lt "$deadline" ]; do
    # The pid must be alive too: a foreign server on the port must not count as ours.
    "$@" && kill -0 "$pid" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}

# start_bg NAME CMD...: detaches CMD from this shell (own session, no tty, output to
# $LOGS/NAME.log) so it survives the caller's terminal, and closes our lock fd 9 (else the
# daemon would hold the lock forever); records its pid in $RUN/NAME.pid. Without job control
# a background child is never a process-group leader, so setsid and nohup exec in place and
# $! is CMD's pid.
start_bg() {
  local name=$1; shift
  setsid nohup "$@" </dev/null >>"$LOGS/$name.log" 2>&1 9>&- &
  echo $! >"$RUN/$name.pid"
}
