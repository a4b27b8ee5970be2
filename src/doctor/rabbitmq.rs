//! The `rabbitmq` and `queues` checks.

use std::str::FromStr;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use super::{CONNECT_TIMEOUT, Finding, Level};
use crate::broker::{self, BrokerError, QueueNames, topology};
use crate::config::{Config, mask_url};

/// The AMQP error code of a failed call, if the broker sent one (404 not found, 406
/// precondition failed, 403 access refused).
fn amqp_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(a) => Some(a.get_id()),
        _ => None,
    }
}

/// The broker's own words for a failed call.
fn amqp_message(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(a) => a.get_message().to_string(),
        _ => e.to_string(),
    }
}

pub(super) async fn check_rabbitmq(cfg: &Config) -> Vec<Finding> {
    // Every address of AMQP_URL; the user and vhost reported are the first's.
    let parsed: Result<Vec<_>, _> = crate::config::url_list(&cfg.amqp_url)
        .into_iter()
        .map(lapin::uri::AMQPUri::from_str)
        .collect();
    let (hosts, vhost, user) = match parsed {
        Ok(list) if !list.is_empty() => (
            list.iter()
                .map(|u| format!("{}:{}", u.authority.host, u.authority.port))
                .collect::<Vec<_>>(),
            list[0].vhost.clone(),
            list[0].authority.userinfo.username.clone(),
        ),
        Ok(_) => {
            return vec![
                Finding::bad(
                    "rabbitmq",
                    Level::Fail,
                    "AMQP_URL is empty".to_string(),
                    "set AMQP_URL to amqp://USER:PASSWORD@HOST:PORT/VHOST",
                ),
                Finding::skip("queues", "no broker"),
            ];
        }
        Err(e) => {
            return vec![
                Finding::bad(
                    "rabbitmq",
                    Level::Fail,
                    format!("AMQP_URL does not parse: {}", mask_url(&e)),
                    "set AMQP_URL to amqp://USER:PASSWORD@HOST:PORT/VHOST",
                ),
                Finding::skip("queues", "no broker"),
            ];
        }
    };
    let at = hosts.join(", ");
    let connected = tokio::time::timeout(
        CONNECT_TIMEOUT,
        broker::connect_indexed(&cfg.amqp_url, "apiary doctor"),
    )
    .await;
    let (conn, answered) = match connected {
        Ok(Ok((c, i))) => (c, hosts.get(i).cloned().unwrap_or_else(|| at.clone())),
        Ok(Err(e)) => {
            return vec![
                rabbitmq_problem(&e, &at, &user, &vhost),
                Finding::skip("queues", "RabbitMQ not reached"),
            ];
        }
        Err(_) => {
            return vec![
                Finding::bad(
                    "rabbitmq",
                    Level::Fail,
                    format!(
                        "RabbitMQ at {at} (AMQP_URL) did not answer within {CONNECT_TIMEOUT:?}"
                    ),
                    "check that RabbitMQ runs there and that nothing blocks the port",
                ),
                Finding::skip("queues", "RabbitMQ not reached"),
            ];
        }
    };
    let mut out = vec![Finding::ok(
        "rabbitmq",
        format!("RabbitMQ answers at {answered}, vhost \"{vhost}\""),
    )];
    // Every queue the configuration names (`default`, `APIARY_QUEUES`, the kinds' queues).
    for queue in cfg.configured_queues() {
        out.extend(check_queues(&conn, &cfg.queue_names(&queue), cfg.queue_type).await);
    }
    let _ = conn.close(200, "doctor done".into()).await;
    out
}

fn rabbitmq_problem(e: &BrokerError, at: &str, user: &str, vhost: &str) -> Finding {
    fn fail(detail: String, fix: impl Into<String>) -> Finding {
        Finding::bad("rabbitmq", Level::Fail, detail, fix)
    }
    let BrokerError::Amqp { source, .. } = e else {
        return fail(
            format!("cannot connect to RabbitMQ at {at}: {e}"),
            "check AMQP_URL and that RabbitMQ runs there",
        );
    };
    match source.kind() {
        lapin::ErrorKind::IOError(io) => fail(
            format!("RabbitMQ at {at} (AMQP_URL) does not answer: {io}"),
            "start RabbitMQ, or point AMQP_URL at the host and port where it runs",
        ),
        _ if amqp_code(source) == Some(403) || source.to_string().contains("ACCESS_REFUSED") => {
            fail(
                format!("RabbitMQ at {at} refused the login of user \"{user}\""),
                "check the user, password and vhost in AMQP_URL (`rabbitmqctl list_users`, \
                 `list_permissions`)",
            )
        }
        // 530 NOT_ALLOWED at connection.open: no such vhost, or no permission on it.
        _ if amqp_code(source) == Some(530) => fail(
            format!(
                "RabbitMQ at {at} does not let user \"{user}\" use vhost \"{vhost}\": {}",
                amqp_message(source)
            ),
            format!(
                "correct the vhost at the end of AMQP_URL (%2f is \"/\"), or create it and grant \
                 access: `rabbitmqctl add_vhost {vhost}`, `rabbitmqctl set_permissions -p {vhost} \
                 {user} \".*\" \".*\" \".*\"`"
            ),
        ),
        _ => fail(
            format!(
                "cannot connect to RabbitMQ at {at}: {}",
                mask_url(&source.to_string())
            ),
            "check AMQP_URL and that RabbitMQ runs there",
        ),
    }
}

/// Each queue: there (a passive declare), and with Apiary's arguments (a declare with them,
/// which the broker refuses on a queue declared otherwise, naming the argument). A queue that
/// exists with the same arguments is left as it was; doctor creates a queue only if one is
/// deleted in the instant between its two declares, and then as `apiary migrate` would.
async fn check_queues(
    conn: &lapin::Connection,
    names: &QueueNames,
    kind: topology::QueueType,
) -> Vec<Finding> {
    let specs = topology::specs(names, kind);
    let total = specs.len();
    let mut missing = Vec::new();
    let mut out = Vec::new();
    for spec in specs {
        // A refused declare closes its channel: one channel per queue.
        let channel = match conn.create_channel().await {
            Ok(c) => c,
            Err(e) => {
                out.push(Finding::bad(
                    "queues",
                    Level::Fail,
                    format!("cannot open a channel: {e}"),
                    "check the broker's channel_max and its log",
                ));
                return out;
            }
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let exists = channel
            .queue_declare(spec.name.as_str().into(), passive, FieldTable::default())
            .await;
        match exists {
            Ok(_) => {}
            Err(e) if amqp_code(&e) == Some(404) => {
                missing.push(spec.name);
                continue;
            }
            Err(e) => {
                out.push(Finding::bad(
                    "queues",
                    Level::Fail,
                    format!("cannot look up queue {}: {}", spec.name, amqp_message(&e)),
                    "check that the AMQP_URL user may configure queues in the vhost",
                ));
                continue;
            }
        }
        let declared = channel
            .queue_declare(spec.name.as_str().into(), topology::durable(), spec.args)
            .await;
        // Refused: of the other type? RabbitMQ names only the first argument that differs,
        // so the broker is asked with each type's arguments.
        if let Err(e) = &declared
            && amqp_code(e) == Some(406)
            && let Some(existing) = topology::probe_type(conn, names, &spec.name).await
            && existing != kind
        {
            out.push(Finding::bad(
                "queues",
                Level::Fail,
                format!(
                    "queue {} is a {existing} queue, but APIARY_QUEUE_TYPE is {kind}",
                    spec.name
                ),
                format!(
                    "set APIARY_QUEUE_TYPE={existing}, or stop every worker and producer and run `apiary migrate-queues --to {kind}`"
                ),
            ));
            continue;
        }
        match declared {
            Ok(_) => {
                let _ = channel.close(200, "checked".into()).await;
            }
            // A work queue from before priorities: it works, without them.
            Err(e) if amqp_code(&e) == Some(406)
                && names.work_queues().contains(&spec.name)
                && amqp_message(&e).contains("x-max-priority") =>
            {
                out.push(Finding::bad(
                    "queues",
                    Level::Warn,
                    format!(
                        "work queue {} has no priority levels (declared by an Apiary from before priorities): jobs run, but their priority is ignored",
                        spec.name
                    ),
                    format!(
                        "to get priorities: stop its producers and workers, let it drain (or move its messages with a shovel),                          delete it (`rabbitmqctl delete_queue {}`), and run `apiary migrate`",
                        spec.name
                    ),
                ))
            }
            Err(e) if amqp_code(&e) == Some(406) => out.push(Finding::bad(
                "queues",
                Level::Fail,
                format!(
                    "queue {} has other arguments than Apiary declares: {}",
                    spec.name,
                    amqp_message(&e)
                ),
                format!(
                    "move its messages elsewhere (a shovel), delete it \
                     (`rabbitmqctl delete_queue {}`), and run `apiary migrate`",
                    spec.name
                ),
            )),
            Err(e) => out.push(Finding::bad(
                "queues",
                Level::Fail,
                format!("cannot check queue {}: {}", spec.name, amqp_message(&e)),
                "check that the AMQP_URL user may configure queues in the vhost",
            )),
        }
    }
    if !missing.is_empty() {
        out.insert(
            0,
            Finding::bad(
                "queues",
                Level::Fail,
                format!(
                    "{} of {total} queues are not declared: {}",
                    missing.len(),
                    missing.join(", ")
                ),
                "run `apiary migrate` (with the same APIARY_QUEUE)",
            ),
        );
    }
    if out.is_empty() {
        out.push(Finding::ok(
            "queues",
            format!(
                "all {total} queues of \"{}\" exist with the expected arguments",
                names.work
            ),
        ));
    }
    out
}
