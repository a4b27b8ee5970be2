# shellcheck shell=bash
# Making sure Postgres and RabbitMQ answer, shared by scripts/test and scripts/run.
#
# Source it, set PG_HOST, PG_PORT, AMQP_HOST and AMQP_PORT, then call
#
#   ensure_services postgres rabbitmq
#
# Each service named there that does not answer is started: from a local install when there
# is one (pg_ctlcluster / rabbitmq-server), otherwise as a container from
# docker/compose.services.yaml, which publishes the standard ports on 127.0.0.1; so name a
# service only when it is meant to be that local default. Both services are then waited for,
# named or not. Nothing here reads standard input.

# How long to wait for a service to accept connections once it was started.
readonly WAIT_SECS=60
readonly COMPOSE_FILE=docker/compose.services.yaml

# Each step says how long the script has run, so a slow run shows where its time went.
step() { printf '==> %s (at %ds)\n' "$*" "$SECONDS"; }
note() { printf '    %s\n' "$*"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# True if something accepts TCP connections on HOST:PORT. Uses bash's own
# /dev/tcp so no extra tool is needed; the timeout covers a dropped SYN.
tcp_open() {
    # shellcheck disable=SC2016 # $1/$2 are expanded by the inner bash.
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

postgres_up() {
    if have pg_isready; then
        # Unlike a bare TCP check, this also waits out "the database system
        # is starting up".
        pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3
    else
        tcp_open "$PG_HOST" "$PG_PORT"
    fi
}

# RabbitMQ opens its AMQP listener last in its boot sequence, so an open port
# means the broker is ready.
rabbitmq_up() { tcp_open "$AMQP_HOST" "$AMQP_PORT"; }

# wait_for NAME CHECK: poll CHECK once a second for up to WAIT_SECS.
wait_for() {
    local name=$1 check=$2
    local deadline=$((SECONDS + WAIT_SECS))
    "$check" && return
    note "waiting up to ${WAIT_SECS}s for $name"
    until "$check"; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 1
    done
    note "$name is up"
}

# The local Postgres cluster that owns PG_PORT, as "VERSION NAME".
local_pg_cluster() {
    if ! have pg_ctlcluster || ! have pg_lsclusters; then
        return 1
    fi
    pg_lsclusters --no-header 2>/dev/null |
        awk -v port="$PG_PORT" '$3 == port { print $1, $2; found = 1; exit } END { exit !found }'
}

# Services that have no local install, to be started with docker compose.
compose_services=()

ensure_postgres() {
    if postgres_up; then
        note "PostgreSQL is up at $PG_HOST:$PG_PORT"
        return
    fi
    local cluster
    if cluster=$(local_pg_cluster); then
        local -a version_name
        read -r -a version_name <<<"$cluster"
        note "starting local PostgreSQL cluster ${version_name[*]}"
        # A failure here may just mean it is already starting; the wait decides.
        pg_ctlcluster --skip-systemctl-redirect "${version_name[@]}" start </dev/null ||
            note "pg_ctlcluster failed; waiting in case the server is already starting"
    else
        compose_services+=(postgres)
    fi
}

ensure_rabbitmq() {
    if rabbitmq_up; then
        note "RabbitMQ is up at $AMQP_HOST:$AMQP_PORT"
        return
    fi
    if have rabbitmq-server; then
        note "starting local RabbitMQ"
        # Fails harmlessly if the node is already running but still booting.
        rabbitmq-server -detached </dev/null ||
            note "rabbitmq-server failed; waiting in case the broker is already starting"
        if have rabbitmqctl; then
            # A full boot can take a while on a cold machine.
            timeout 120 rabbitmqctl -q await_startup </dev/null ||
                note "rabbitmqctl await_startup did not succeed; waiting for the port"
        fi
    else
        compose_services+=(rabbitmq)
    fi
}

# ensure_services [postgres] [rabbitmq]: start the named services if they are down, then
# wait until both answer; dies with the reason otherwise.
ensure_services() {
    local service
    for service in "$@"; do
        case $service in
        postgres) ensure_postgres ;;
        rabbitmq) ensure_rabbitmq ;;
        *) die "ensure_services: unknown service $service" ;;
        esac
    done

    if ((${#compose_services[@]})); then
        local missing=${compose_services[*]}
        if ! have docker || ! docker compose version >/dev/null 2>&1; then
            die "$missing not reachable, not installed locally, and no 'docker compose' to start it from $COMPOSE_FILE"
        fi
        note "no local install of $missing; starting it from $COMPOSE_FILE"
        docker compose -f "$COMPOSE_FILE" up -d --wait "${compose_services[@]}" </dev/null ||
            die "could not start $missing with docker compose (is the Docker engine running?)"
    fi

    wait_for PostgreSQL postgres_up ||
        die "PostgreSQL is not reachable at $PG_HOST:$PG_PORT after ${WAIT_SECS}s"
    wait_for RabbitMQ rabbitmq_up ||
        die "RabbitMQ is not reachable at $AMQP_HOST:$AMQP_PORT after ${WAIT_SECS}s"
}
