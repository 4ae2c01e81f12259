//! What the store asks the primary at each (re)connect: whether it persists anything
//! (`CONFIG GET appendonly` / `save`), how many replicas it has (`INFO replication`),
//! and, with Sentinels, whether it is still the primary (`ROLE`).
//!
//! `CONFIG` is often disabled on managed Redis (renamed, or denied by ACL): then the
//! persistence is "unknown" and nothing is warned, since nothing is known.

use redis::aio::MultiplexedConnection;

/// What Redis keeps across its own restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Persistence {
    /// `CONFIG GET` was refused or failed; the reason.
    Unknown(String),
    /// AOF and/or RDB snapshots.
    Persists {
        /// `appendonly yes`.
        aof: bool,
        /// Non-empty `save` rules.
        rdb: bool,
    },
    /// Neither: a restart of this Redis loses every revocation it holds.
    Nothing,
}

impl Persistence {
    pub(super) fn describe(&self) -> String {
        match self {
            Persistence::Unknown(reason) => format!("unknown ({reason})"),
            Persistence::Persists { aof, rdb } => match (aof, rdb) {
                (true, true) => "aof+rdb".into(),
                (true, false) => "aof".into(),
                _ => "rdb".into(),
            },
            Persistence::Nothing => "none".into(),
        }
    }

    fn from_config(appendonly: &str, save: &str) -> Self {
        let aof = appendonly.eq_ignore_ascii_case("yes");
        let rdb = !save.trim().is_empty();
        if aof || rdb {
            Persistence::Persists { aof, rdb }
        } else {
            Persistence::Nothing
        }
    }
}

async fn config_get(
    connection: &mut MultiplexedConnection,
    name: &str,
) -> redis::RedisResult<String> {
    // RESP2 answers a flat [name, value] array; an unknown name gives an empty one.
    let reply: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(connection)
        .await?;
    Ok(reply.into_iter().nth(1).unwrap_or_default())
}

pub(super) async fn persistence(connection: &mut MultiplexedConnection) -> Persistence {
    let appendonly = match config_get(connection, "appendonly").await {
        Ok(value) => value,
        Err(error) => return Persistence::Unknown(format!("CONFIG GET refused: {error}")),
    };
    match config_get(connection, "save").await {
        Ok(save) => Persistence::from_config(&appendonly, &save),
        Err(error) => Persistence::Unknown(format!("CONFIG GET refused: {error}")),
    }
}

/// `connected_slaves` of `INFO replication`; `None` when it cannot be read.
pub(super) async fn connected_replicas(connection: &mut MultiplexedConnection) -> Option<u32> {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(connection)
        .await
        .ok()?;
    parse_connected_replicas(&info)
}

fn parse_connected_replicas(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix("connected_slaves:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Whether the node says `ROLE` master.
pub(super) async fn is_primary(connection: &mut MultiplexedConnection) -> redis::RedisResult<bool> {
    let role: redis::Value = redis::cmd("ROLE").query_async(connection).await?;
    Ok(role_is_master(&role))
}

fn role_is_master(role: &redis::Value) -> bool {
    let redis::Value::Array(items) = role else {
        return false;
    };
    matches!(
        items.first(),
        Some(redis::Value::BulkString(name)) if name == b"master"
    ) || matches!(items.first(), Some(redis::Value::SimpleString(name)) if name == "master")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persistence_is_nothing_only_without_aof_and_save_rules() {
        assert_eq!(Persistence::from_config("no", ""), Persistence::Nothing);
        assert_eq!(Persistence::from_config("no", "  "), Persistence::Nothing);
        assert_eq!(
            Persistence::from_config("yes", ""),
            Persistence::Persists {
                aof: true,
                rdb: false
            }
        );
        assert_eq!(
            Persistence::from_config("no", "3600 1 300 100 60 10000"),
            Persistence::Persists {
                aof: false,
                rdb: true
            }
        );
        assert_eq!(
            Persistence::from_config("yes", "900 1").describe(),
            "aof+rdb"
        );
    }

    #[test]
    fn replicas_and_role_are_read_from_redis_answers() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\nslave0:ip=127.0.0.1\r\n";
        assert_eq!(parse_connected_replicas(info), Some(2));
        assert_eq!(parse_connected_replicas("role:slave\r\n"), None);
        let master = redis::Value::Array(vec![
            redis::Value::BulkString(b"master".to_vec()),
            redis::Value::Int(42),
            redis::Value::Array(vec![]),
        ]);
        assert!(role_is_master(&master));
        let replica = redis::Value::Array(vec![redis::Value::BulkString(b"slave".to_vec())]);
        assert!(!role_is_master(&replica));
    }
}
