#!/bin/sh
# One Redis data node of gpugate's Sentinel group (docker-compose.yml, k8s/redis.yaml).
#
# A node must not decide its role from a fixed command line: after a failover the old
# master would come back as a master (two masters), or the promoted replica as a replica
# of a node that is now itself a replica. So at every start this script asks the
# Sentinels which node is the master now and starts as that node's replica, or as the
# master when they name this node. Only when no Sentinel answers for
# REDIS_SENTINEL_WAIT_S seconds (the very first start, before the Sentinels run) does it
# fall back to REDIS_SEED_MASTER.
#
# Environment:
#   REDIS_ANNOUNCE_HOST  the address the others reach this node at (an IP, or a DNS name
#                        that resolves even while the node is down)
#   REDIS_PORT           its port (6379)
#   REDIS_SEED_MASTER    host:port of the node that is the master at the first start
#   REDIS_SENTINELS      the Sentinels, "host:port host:port ..."
#   REDIS_MASTER_SET     the master's name at the Sentinels (gpugate)
#   REDIS_PASSWORD       optional: requirepass and masterauth of every node
#   REDIS_SENTINEL_WAIT_S  how long to wait for a Sentinel to answer (10)
# Arguments: passed to redis-server first (a config file and/or --options).
set -eu

: "${REDIS_ANNOUNCE_HOST:?the address of this node}"
: "${REDIS_SEED_MASTER:?host:port of the first master}"
: "${REDIS_SENTINELS:?the Sentinels, host:port ...}"
port=${REDIS_PORT:-6379}
master_set=${REDIS_MASTER_SET:-gpugate}
wait_s=${REDIS_SENTINEL_WAIT_S:-10}
if [ -n "${REDIS_PASSWORD:-}" ]; then
    export REDISCLI_AUTH="$REDIS_PASSWORD"
fi

# "EPOCH host:port" of every Sentinel that answers, one a line: where it says the master
# is now (during a failover already the promoted replica) and the config epoch of its view.
sentinel_views() {
    for sentinel in $REDIS_SENTINELS; do
        [ "$sentinel" = "${SKIP_SENTINEL:-}" ] && continue
        h=${sentinel%:*} p=${sentinel##*:}
        # shellcheck disable=SC2046  # two words: host and port
        set -- $(timeout 3 redis-cli --no-auth-warning -h "$h" -p "$p" --raw \
            SENTINEL get-master-addr-by-name "$master_set" 2>/dev/null)
        [ $# -eq 2 ] || continue
        epoch=$(timeout 3 redis-cli --no-auth-warning -h "$h" -p "$p" --raw \
            SENTINEL MASTER "$master_set" 2>/dev/null |
            awk 'prev == "config-epoch" { print $0 + 0; exit } { prev = $0 }')
        echo "${epoch:-0} $1:$2"
    done
}

# "host:port" of the master: once every Sentinel that answers names the same node, or,
# after wait_s seconds, the view with the highest epoch (a Sentinel may be a second
# behind a failover). Nothing if no Sentinel answers within wait_s.
ask_sentinels() {
    deadline=$(($(date +%s) + wait_s))
    while :; do
        views=$(sentinel_views)
        now=$(date +%s)
        if [ -n "$views" ]; then
            named=$(echo "$views" | cut -d' ' -f2 | sort -u | wc -l | tr -d ' ')
            if [ "$named" -eq 1 ] || [ "$now" -ge "$deadline" ]; then
                echo "$views" | sort -n -r | head -n 1 | cut -d' ' -f2
                return 0
            fi
        elif [ "$now" -ge "$deadline" ]; then
            return 1
        fi
        sleep 1
    done
}

if ! master=$(ask_sentinels); then
    master=$REDIS_SEED_MASTER
    echo "redis-node: no Sentinel answered in ${wait_s}s; first start: the master is $master"
fi

set -- "$@" --port "$port" --replica-announce-ip "$REDIS_ANNOUNCE_HOST" \
    --replica-announce-port "$port"
if [ -n "${REDIS_PASSWORD:-}" ]; then
    set -- "$@" --requirepass "$REDIS_PASSWORD" --masterauth "$REDIS_PASSWORD"
else
    set -- "$@" --protected-mode no # no password: the private network is the boundary
fi
if [ "$master" != "$REDIS_ANNOUNCE_HOST:$port" ]; then
    set -- "$@" --replicaof "${master%:*}" "${master##*:}"
fi
echo "redis-node: this is $REDIS_ANNOUNCE_HOST:$port; the master is $master"
exec redis-server "$@"
