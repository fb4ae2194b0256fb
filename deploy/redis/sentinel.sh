#!/bin/sh
# One Redis Sentinel of gpugate's Sentinel group (docker-compose.yml, k8s/redis.yaml).
#
# Sentinel rewrites its own config file as it learns the group (the current master, the
# replicas, the other Sentinels, the epoch), so the file lives on a volume and is
# written here only when it does not exist yet. A Sentinel that starts without one
# monitors the master the other Sentinels name, or REDIS_SEED_MASTER if none answers.
#
# Environment:
#   SENTINEL_ANNOUNCE_HOST  the address the others reach this Sentinel at
#   SENTINEL_PORT           its port (26379)
#   SENTINEL_CONF           its config file (/data/sentinel.conf), on a volume
#   SENTINEL_BIND           optional: the addresses to listen on (default: all)
#   SENTINEL_HOSTNAMES      yes: the nodes and Sentinels are DNS names (resolve-hostnames
#                           and announce-hostnames); no: IP addresses (default)
#   SENTINEL_QUORUM         Sentinels that must agree the master is down (2)
#   SENTINEL_DOWN_AFTER_MS  how long the master may not answer before it is down (5000)
#   SENTINEL_FAILOVER_TIMEOUT_MS  (60000)
#   REDIS_SEED_MASTER       host:port of the node that is the master at the first start
#   REDIS_SENTINELS         every Sentinel, "host:port host:port ..." (this one too)
#   REDIS_MASTER_SET        the master's name (gpugate)
#   REDIS_PASSWORD          optional: the nodes' password, also required by the Sentinel
set -eu

: "${SENTINEL_ANNOUNCE_HOST:?the address of this Sentinel}"
: "${REDIS_SEED_MASTER:?host:port of the first master}"
: "${REDIS_SENTINELS:?the Sentinels, host:port ...}"
port=${SENTINEL_PORT:-26379}
conf=${SENTINEL_CONF:-/data/sentinel.conf}
hostnames=${SENTINEL_HOSTNAMES:-no}
master_set=${REDIS_MASTER_SET:-gpugate}
wait_s=0 # ask the others once: at the first start they all start together
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

if [ ! -s "$conf" ]; then
    SKIP_SENTINEL="$SENTINEL_ANNOUNCE_HOST:$port" # not up yet: do not ask this one
    master=$(ask_sentinels) || master=$REDIS_SEED_MASTER
    echo "sentinel: no $conf yet; monitoring $master as $master_set"
    mkdir -p "$(dirname "$conf")"
    {
        echo "port $port"
        if [ -n "${SENTINEL_BIND:-}" ]; then
            echo "bind $SENTINEL_BIND"
        fi
        echo "dir $(dirname "$conf")"
        echo "sentinel resolve-hostnames $hostnames"
        echo "sentinel announce-hostnames $hostnames"
        echo "sentinel announce-ip $SENTINEL_ANNOUNCE_HOST"
        echo "sentinel announce-port $port"
        echo "sentinel monitor $master_set ${master%:*} ${master##*:} ${SENTINEL_QUORUM:-2}"
        echo "sentinel down-after-milliseconds $master_set ${SENTINEL_DOWN_AFTER_MS:-5000}"
        echo "sentinel failover-timeout $master_set ${SENTINEL_FAILOVER_TIMEOUT_MS:-60000}"
        echo "sentinel parallel-syncs $master_set 1"
        if [ -n "${REDIS_PASSWORD:-}" ]; then
            echo "sentinel auth-pass $master_set $REDIS_PASSWORD"
            echo "requirepass $REDIS_PASSWORD"
        else
            echo "protected-mode no"
        fi
    } >"$conf.tmp"
    mv "$conf.tmp" "$conf"
fi

exec redis-server "$conf" --sentinel
