//! The `chatgate` command line: `serve`, `token create|inspect`, `config check`,
//! `revoke`. Argument parsing and presentation only: each command calls the library.

use crate::inspect::{InspectedApp, inspect};
use crate::serve::{ServeArgs, ServeError, serve};
use chatgate::config::{App, ConfigSnapshot};
use chatgate::revocation::StoreError;
use chatgate::token::TokenBuilder;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// chatgate: an auth gate for Stream-style chat APIs.
#[derive(Debug, Parser)]
#[command(name = "chatgate", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mint or explain tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Validate config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run the edge proxy (and its admin listener) with a config file.
    Serve(ServeArgs),
    /// Revoke (or un-revoke) tokens in the configured revocation store.
    #[command(subcommand)]
    Revoke(RevokeCommand),
}

/// `chatgate token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a user token (or a server token with --server), signed with the app's first secret.
    Create(CreateArgs),
    /// Decode a token and say which check passes or fails and why.
    Inspect(InspectArgs),
}

/// `chatgate token create`
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The config file holding the app's secret.
    #[arg(long, default_value = "config.toml")]
    pub config: PathBuf,
    /// The app.
    #[arg(long)]
    pub api_key: String,
    /// The user the token is for.
    #[arg(long, conflicts_with = "server", required_unless_present = "server")]
    pub user: Option<String>,
    /// Mint a server token instead (full access, no user_id).
    #[arg(long)]
    pub server: bool,
    /// Lifetime, e.g. `1h`, `30m`, `7d` (default: no exp).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Leave out iat (as legacy SDKs do; such tokens fall to any revocation).
    #[arg(long)]
    pub no_iat: bool,
}

/// `chatgate token inspect`
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The token (or `-` to read it from stdin).
    pub token: String,
    /// A config to verify the signature and times against.
    #[arg(long, requires = "api_key")]
    pub config: Option<PathBuf>,
    /// The app to verify against.
    #[arg(long, requires = "config")]
    pub api_key: Option<String>,
}

/// `chatgate config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file: exit 0 and a summary, or the error with file:line:column and key.
    Check {
        /// The file.
        file: PathBuf,
    },
}

/// `chatgate revoke ...`
#[derive(Debug, Subcommand)]
pub enum RevokeCommand {
    /// Revoke one user's tokens issued before a time (default: now), or clear that.
    User(RevokeUserArgs),
    /// Revoke every user token of the app issued before a time (default: now), or clear that.
    App(RevokeArgs),
}

/// `chatgate revoke user`
#[derive(Debug, Args)]
pub struct RevokeUserArgs {
    /// The user whose tokens to revoke.
    pub user: String,
    /// Where, when and how.
    #[command(flatten)]
    pub revoke: RevokeArgs,
}

/// What `revoke user` and `revoke app` share.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The config file naming the store (`[revocation]`) and the app.
    #[arg(long, default_value = "config.toml")]
    pub config: PathBuf,
    /// The app.
    #[arg(long)]
    pub api_key: String,
    /// Revoke tokens issued before this time (RFC 3339, or any date format the SDKs send;
    /// naive times are UTC). Default: now.
    #[arg(long)]
    pub before: Option<String>,
    /// Remove the cutoff instead (tokens issued before it work again).
    #[arg(long, conflicts_with = "before")]
    pub clear: bool,
}

/// Why a command failed; printed as `error: {message}`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The config file.
    #[error(transparent)]
    Config(#[from] chatgate::ConfigError),
    /// `--api-key` names no configured app.
    #[error("{}: no app with api_key {api_key:?} (configured: {known})", .config.display())]
    UnknownApp {
        /// The config file.
        config: PathBuf,
        /// The key asked for.
        api_key: String,
        /// The configured keys, comma-separated.
        known: String,
    },
    /// `--user ""`.
    #[error("--user must not be empty")]
    EmptyUser,
    /// `revoke user ""`.
    #[error("the user id must not be empty")]
    EmptyUserId,
    /// `revoke` on a store only the running process holds.
    #[error(
        "{}: [revocation] store = \"memory\" lives inside the running process, so a \
         command cannot change it: use PATCH /{path} of that process with a server token \
         (`chatgate token create --server --api-key {api_key}`)",
        .config.display()
    )]
    MemoryStore {
        /// The config file.
        config: PathBuf,
        /// `users` or `app`.
        path: &'static str,
        /// The app.
        api_key: String,
    },
    /// `--before` is not a date.
    #[error("--before: {0}")]
    Before(#[from] chatgate::time::TimeError),
    /// `--before` is too far ahead.
    #[error("--before: {0} is more than 5 minutes in the future")]
    FutureCutoff(String),
    /// The store is held by a running proxy; the message says how to go through it.
    #[error("{0}")]
    StoreLocked(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store took longer than [`CLI_STORE_TIMEOUT`].
    #[error("the revocation store did not answer within 10 s")]
    StoreTimeout,
    /// The async runtime did not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// stdin could not be read.
    #[error(transparent)]
    Stdin(std::io::Error),
    /// `token inspect` found a failing check.
    #[error("the token would be rejected")]
    Rejected,
    /// `serve`.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Parses the process arguments and runs.
pub fn main() -> ExitCode {
    run(Cli::parse())
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Token(TokenCommand::Create(args)) => create_token(&args).map(|t| println!("{t}")),
        Command::Token(TokenCommand::Inspect(args)) => inspect_token(&args),
        Command::Config(ConfigCommand::Check { file }) => check_config(&file),
        Command::Serve(args) => serve(&args).map_err(CliError::from),
        Command::Revoke(command) => revoke(&command).map(|done| println!("{done}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn load_app(
    config: &std::path::Path,
    api_key: &str,
) -> Result<(ConfigSnapshot, std::sync::Arc<App>), CliError> {
    let snapshot = ConfigSnapshot::load(config)?;
    let app = snapshot.app(api_key).cloned().ok_or_else(|| {
        let known: Vec<&str> = snapshot.apps().map(|a| &*a.api_key).collect();
        CliError::UnknownApp {
            config: config.to_owned(),
            api_key: api_key.to_owned(),
            known: known.join(", "),
        }
    })?;
    Ok((snapshot, app))
}

/// `token create`: the token text.
pub fn create_token(args: &CreateArgs) -> Result<String, CliError> {
    let (_, app) = load_app(&args.config, &args.api_key)?;
    let mut builder = match &args.user {
        Some(user) if !user.is_empty() => TokenBuilder::user(user),
        Some(_) => return Err(CliError::EmptyUser),
        None => TokenBuilder::server(),
    };
    if args.no_iat {
        builder = builder.without_iat();
    }
    if let Some(ttl) = args.ttl {
        builder = builder.expires_in(ttl);
    }
    Ok(builder.sign(app.signing_secret()))
}

fn inspect_token(args: &InspectArgs) -> Result<(), CliError> {
    let token = if args.token == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(CliError::Stdin)?;
        text.trim().to_owned()
    } else {
        args.token.clone()
    };
    let loaded = match (&args.config, &args.api_key) {
        (Some(config), Some(api_key)) => Some(load_app(config, api_key)?),
        _ => None,
    };
    let report = inspect(
        &token,
        loaded.as_ref().map(|(snapshot, app)| InspectedApp {
            api_key: &app.api_key,
            keyring: app.keyring(),
            rules: app.token_rules(&snapshot.auth),
        }),
        chatgate::time::now_unix(),
    );
    let mut failed = false;
    for check in &report {
        match &check.outcome {
            Ok(detail) => println!("ok    {:<10} {detail}", check.name),
            Err(why) => {
                failed = true;
                println!("FAIL  {:<10} {why}", check.name)
            }
        }
    }
    if failed {
        Err(CliError::Rejected)
    } else {
        Ok(())
    }
}

fn check_config(file: &std::path::Path) -> Result<(), CliError> {
    let snapshot = ConfigSnapshot::load(file)?;
    println!(
        "{}: ok ({} app(s), listen {}, upstream {}, store {:?}, hash {})",
        file.display(),
        snapshot.apps().count(),
        snapshot.server.listen,
        snapshot.upstream.addresses.join(","),
        snapshot.revocation.store,
        snapshot.content_hash
    );
    Ok(())
}

/// How long the CLI waits for the store (it is not on a request path, so more than
/// `store_timeout_ms`).
const CLI_STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// `revoke user|app`: applies the change to the configured store and says what it did.
pub fn revoke(command: &RevokeCommand) -> Result<String, CliError> {
    let (target, args) = match command {
        RevokeCommand::User(args) => {
            if args.user.is_empty() {
                return Err(CliError::EmptyUserId);
            }
            (Some(args.user.as_str()), &args.revoke)
        }
        RevokeCommand::App(args) => (None, args),
    };
    let (snapshot, app) = load_app(&args.config, &args.api_key)?;
    if snapshot.revocation.store == chatgate::config::StoreKind::Memory {
        return Err(CliError::MemoryStore {
            config: args.config.clone(),
            path: if target.is_some() { "users" } else { "app" },
            api_key: args.api_key.clone(),
        });
    }
    let cutoff = if args.clear {
        None
    } else {
        Some(revoke_cutoff(args.before.as_deref())?)
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    runtime.block_on(async {
        let store = open_cli_store(&snapshot.revocation, &app.api_key, target).await?;
        let write = async {
            match target {
                Some(user) => {
                    let change = chatgate::revocation::UserCutoffChange {
                        user_id: user.to_owned(),
                        cutoff,
                    };
                    store
                        .set_user_cutoffs(&app.api_key, std::slice::from_ref(&change))
                        .await
                }
                None => store.set_app_cutoff(&app.api_key, cutoff).await,
            }
        };
        match tokio::time::timeout(CLI_STORE_TIMEOUT, write).await {
            Ok(written) => written.map_err(CliError::from),
            Err(_) => Err(CliError::StoreTimeout),
        }
    })?;
    let whose = match target {
        Some(user) => format!("user {user:?} of app {:?}", &*app.api_key),
        None => format!("every user of app {:?}", &*app.api_key),
    };
    let store = describe_store(&snapshot.revocation);
    Ok(match cutoff {
        Some(cutoff) => format!(
            "revoked tokens of {whose} issued before {} ({store})",
            cutoff.to_rfc3339()
        ),
        None => format!("cleared the revocation cutoff of {whose} ({store})"),
    })
}

/// `--before` (or now), rounded up to the whole second like the API's cutoffs.
fn revoke_cutoff(before: Option<&str>) -> Result<chatgate::time::Cutoff, CliError> {
    let at = match before {
        Some(text) => chatgate::time::parse_stream_time(text)?,
        None => chrono::Utc::now(),
    };
    // Same bound as the API's (contract §3): a far-future cutoff is a typo, and it
    // would lock every user out until then.
    if at.timestamp() > chatgate::time::now_unix() + 300 {
        return Err(CliError::FutureCutoff(at.to_rfc3339()));
    }
    Ok(chatgate::time::Cutoff::from_datetime(at))
}

fn describe_store(settings: &chatgate::config::RevocationSettings) -> String {
    use chatgate::config::StoreKind;
    match settings.store {
        StoreKind::Memory => "store: memory".into(),
        StoreKind::Embedded => format!("store: embedded {}", settings.path.display()),
        StoreKind::Redis => format!("store: redis {}", settings.redis_url),
        other => format!("store: {other:?}"),
    }
}

/// Opens the configured store; an embedded file held by a running proxy gets an error
/// that says how to revoke through that proxy instead.
async fn open_cli_store(
    settings: &chatgate::config::RevocationSettings,
    api_key: &str,
    user: Option<&str>,
) -> Result<std::sync::Arc<dyn chatgate::revocation::RevocationStore>, CliError> {
    #[cfg(feature = "embedded")]
    if settings.store == chatgate::config::StoreKind::Embedded {
        use chatgate::revocation::embedded::{EmbeddedStore, OpenError};
        return match EmbeddedStore::try_open(&settings.path) {
            Ok(store) => Ok(std::sync::Arc::new(store)),
            Err(locked @ OpenError::Locked(_)) => {
                Err(CliError::StoreLocked(locked_hint(&locked, api_key, user)))
            }
            Err(other) => Err(StoreError::from(other).into()),
        };
    }
    let _ = (api_key, user);
    tokio::time::timeout(
        CLI_STORE_TIMEOUT,
        chatgate::revocation::open_store(settings),
    )
    .await
    .map_err(|_| CliError::StoreTimeout)?
    .map_err(CliError::from)
}

#[cfg(feature = "embedded")]
fn locked_hint(
    locked: &chatgate::revocation::embedded::OpenError,
    api_key: &str,
    user: Option<&str>,
) -> String {
    let (path, body) = match user {
        Some(user) => (
            "users",
            serde_json::json!({"users": [{"id": user, "set": {"revoke_tokens_issued_before": "<TIME>"}}]}),
        ),
        None => (
            "app",
            serde_json::json!({"revoke_tokens_issued_before": "<TIME>"}),
        ),
    };
    format!(
        "{locked}\n\
         While the proxy runs, revoke through it: PATCH /{path} with a server token.\n  \
         TOKEN=$(chatgate token create --server --api-key {api_key})\n  \
         curl -X PATCH \"http://<proxy>/{path}?api_key={api_key}\" -H \"Authorization: $TOKEN\" \\\n    \
         -H 'Content-Type: application/json' -d '{body}'\n\
         (<TIME> in RFC 3339, or null to clear)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_file() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            "[revocation]\nstore = \"memory\"\n[[apps]]\napi_key = \"k\"\nsecrets = [\"s\"]\n",
        )
        .unwrap();
        file
    }

    #[test]
    fn create_signs_with_the_configured_secret() {
        let file = config_file();
        let cli = Cli::try_parse_from([
            "chatgate",
            "token",
            "create",
            "--config",
            file.path().to_str().unwrap(),
            "--api-key",
            "k",
            "--user",
            "alice",
            "--ttl",
            "1h",
        ])
        .unwrap();
        let Command::Token(TokenCommand::Create(args)) = cli.command else {
            panic!()
        };
        let token = create_token(&args).unwrap();
        let (snapshot, app) = load_app(file.path(), "k").unwrap();
        let verified = chatgate::token::verify(
            &token,
            app.keyring(),
            &app.token_rules(&snapshot.auth),
            chatgate::time::now_unix(),
        )
        .unwrap();
        assert_eq!(verified.claims.user_id.as_deref(), Some("alice"));
        let exp = verified.claims.expires_at.unwrap();
        assert!((exp - chatgate::time::now_unix() - 3600).abs() <= 2);
        assert!(verified.claims.issued_at.is_some());
    }

    #[test]
    fn create_rejects_unknown_apps_and_needs_user_or_server() {
        let file = config_file();
        let path = file.path().to_str().unwrap();
        let cli = Cli::try_parse_from([
            "chatgate",
            "token",
            "create",
            "--config",
            path,
            "--api-key",
            "x",
            "--server",
        ])
        .unwrap();
        let Command::Token(TokenCommand::Create(args)) = cli.command else {
            panic!()
        };
        assert!(
            create_token(&args)
                .unwrap_err()
                .to_string()
                .contains("no app with api_key \"x\"")
        );
        assert!(
            Cli::try_parse_from([
                "chatgate",
                "token",
                "create",
                "--config",
                path,
                "--api-key",
                "k"
            ])
            .is_err()
        );
        assert!(
            Cli::try_parse_from([
                "chatgate",
                "token",
                "create",
                "--api-key",
                "k",
                "--user",
                "u",
                "--server"
            ])
            .is_err()
        );
    }

    fn embedded_config() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[revocation]\nstore = \"embedded\"\npath = \"revocations.db\"\n\
             [[apps]]\napi_key = \"k\"\nsecrets = [\"s\"]\n",
        )
        .unwrap();
        (dir, path)
    }

    fn revoke_command(config: &std::path::Path, args: &[&str]) -> Result<RevokeCommand, String> {
        let mut argv = vec!["chatgate", "revoke"];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--config", config.to_str().unwrap()]);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Revoke(command) => Ok(command),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn stored(dir: &std::path::Path) -> (Option<Cutoff>, Option<Cutoff>) {
        let store = EmbeddedStore::open(&dir.join("revocations.db")).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            (
                store.user_cutoff("k", "alice").await.unwrap(),
                store.app_cutoff("k").await.unwrap(),
            )
        })
    }

    use chatgate::revocation::RevocationStore;
    use chatgate::revocation::embedded::EmbeddedStore;
    use chatgate::time::Cutoff;

    #[test]
    fn revoke_user_writes_the_embedded_store_and_clear_removes_it() {
        let (dir, config) = embedded_config();
        // a naive time with a fraction: UTC, rounded up to the next second
        let command = revoke_command(
            &config,
            &[
                "user",
                "alice",
                "--api-key",
                "k",
                "--before",
                "2020-01-01T10:00:00.5",
            ],
        )
        .unwrap();
        let said = revoke(&command).unwrap();
        assert!(said.contains("\"alice\""), "{said}");
        assert!(said.contains("2020-01-01T10:00:01Z"), "{said}");
        assert!(said.contains("revocations.db"), "{said}");
        let expected = Cutoff::from_unix_seconds(1_577_872_801);
        assert_eq!(stored(dir.path()), (Some(expected), None));

        let command = revoke_command(&config, &["user", "alice", "--api-key", "k", "--clear"]);
        let said = revoke(&command.unwrap()).unwrap();
        assert!(said.starts_with("cleared"), "{said}");
        assert_eq!(stored(dir.path()), (None, None));
    }

    #[test]
    fn revoke_app_defaults_to_now_and_can_be_cleared() {
        let (dir, config) = embedded_config();
        let before = chatgate::time::now_unix();
        revoke(&revoke_command(&config, &["app", "--api-key", "k"]).unwrap()).unwrap();
        let after = chatgate::time::now_unix();
        let (_, app) = stored(dir.path());
        let app = app.expect("an app cutoff").unix_seconds();
        // now, rounded up: a token minted in this very second is revoked too
        assert!((before..=after + 1).contains(&app), "{app}");
        revoke(&revoke_command(&config, &["app", "--api-key", "k", "--clear"]).unwrap()).unwrap();
        assert_eq!(stored(dir.path()), (None, None));
    }

    #[test]
    fn revoke_rejects_unknown_apps_bad_times_and_contradictions() {
        let (_dir, config) = embedded_config();
        let unknown = revoke_command(&config, &["user", "u", "--api-key", "nope"]).unwrap();
        assert!(
            revoke(&unknown)
                .unwrap_err()
                .to_string()
                .contains("no app with api_key \"nope\"")
        );
        let bad = revoke_command(&config, &["app", "--api-key", "k", "--before", "someday"]);
        assert!(
            revoke(&bad.unwrap())
                .unwrap_err()
                .to_string()
                .contains("--before")
        );
        let future = revoke_command(
            &config,
            &["app", "--api-key", "k", "--before", "2999-01-01T00:00:00Z"],
        );
        assert!(
            revoke(&future.unwrap())
                .unwrap_err()
                .to_string()
                .contains("future")
        );
        let memory = config_file();
        let error = revoke(&revoke_command(memory.path(), &["app", "--api-key", "k"]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.contains("PATCH /app"), "{error}");
        assert!(
            revoke_command(
                &config,
                &["app", "--api-key", "k", "--clear", "--before", "2020-01-01"]
            )
            .is_err()
        );
    }

    #[test]
    fn revoke_on_a_file_held_by_a_running_proxy_points_at_the_endpoint() {
        let (dir, config) = embedded_config();
        let _proxy = EmbeddedStore::open(&dir.path().join("revocations.db")).unwrap();
        let error = revoke(&revoke_command(&config, &["user", "alice", "--api-key", "k"]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.contains("locked"), "{error}");
        assert!(error.contains("PATCH /users"), "{error}");
        assert!(
            error.contains("token create --server --api-key k"),
            "{error}"
        );
        assert!(error.contains(r#""id":"alice""#), "{error}");
        let error = revoke(&revoke_command(&config, &["app", "--api-key", "k"]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.contains("PATCH /app"), "{error}");
    }

    #[test]
    fn serve_takes_the_config_and_upgrade_flags() {
        let cli =
            Cli::try_parse_from(["chatgate", "serve", "--config", "x.toml", "--upgrade"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.config, PathBuf::from("x.toml"));
        assert!(args.upgrade);
        assert_eq!(
            args.upgrade_sock,
            PathBuf::from("/tmp/chatgate-upgrade.sock")
        );
    }
}
