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
#[command(
    name = "chatgate",
    version,
    about,
    propagate_version = true,
    after_help = "Examples:\n  chatgate serve --config config.toml\n  chatgate config check config.toml\n  chatgate token create --api-key demo-key --user alice --ttl 1h\n  chatgate revoke user alice --api-key demo-key\n\nEach subcommand's --help has its own examples."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mint or explain tokens.
    #[command(
        subcommand,
        after_help = "Examples:\n  chatgate token create --api-key demo-key --user alice --ttl 1h\n  chatgate token inspect \"$TOKEN\" --config config.toml --api-key demo-key"
    )]
    Token(TokenCommand),
    /// Validate config files.
    #[command(
        subcommand,
        after_help = "Examples:\n  chatgate config check config.toml"
    )]
    Config(ConfigCommand),
    /// Run the edge proxy (and its admin listener) with a config file.
    #[command(
        after_help = "Examples:\n  chatgate serve --config config.toml\n  RUST_LOG=chatgate=debug chatgate serve --config /etc/chatgate/config.toml\n  # zero-downtime upgrade: start the new binary, then SIGQUIT the old one\n  chatgate serve --config config.toml --upgrade && kill -QUIT <old pid>\n\nSignals: SIGHUP reloads the config, SIGTERM drains and exits, SIGINT exits at once."
    )]
    Serve(ServeArgs),
    /// Revoke (or un-revoke) tokens in the configured revocation store.
    #[command(
        subcommand,
        after_help = "Examples:\n  chatgate revoke user alice --api-key demo-key\n  chatgate revoke app --api-key demo-key --clear"
    )]
    Revoke(RevokeCommand),
}

/// `chatgate token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a user token (or a server token with --server), signed with the app's first secret.
    #[command(
        after_help = "Examples:\n  chatgate token create --api-key demo-key --user alice --ttl 1h\n  chatgate token create --api-key demo-key --user alice --no-iat\n  chatgate token create --api-key demo-key --server\n  TOKEN=$(chatgate token create --config /etc/chatgate/config.toml --api-key demo-key --user alice)"
    )]
    Create(CreateArgs),
    /// Decode a token and say which check passes or fails and why.
    #[command(
        after_help = "Examples:\n  chatgate token inspect \"$TOKEN\"\n  chatgate token inspect \"$TOKEN\" --config config.toml --api-key demo-key\n  echo \"$TOKEN\" | chatgate token inspect - --config config.toml --api-key demo-key\n\nExit status 1 when a check fails. Secrets are never printed."
    )]
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
    #[command(
        after_help = "Examples:\n  chatgate config check config.toml\n  chatgate config check /etc/chatgate/config.toml && systemctl reload chatgate\n  # what a reload from running.toml to new.toml would change\n  chatgate config check running.toml new.toml\n\nWarnings (exit status 0): the demo secret, secrets shorter than 32 bytes."
    )]
    Check {
        /// The file.
        file: PathBuf,
        /// A second file: check it too and print what replacing FILE with it changes
        /// (what a reload would do).
        newer: Option<PathBuf>,
    },
}

/// `chatgate revoke ...`
#[derive(Debug, Subcommand)]
pub enum RevokeCommand {
    /// Revoke one user's tokens issued before a time (default: now), or clear that.
    #[command(
        after_help = "Examples:\n  chatgate revoke user alice --api-key demo-key\n  chatgate revoke user alice --api-key demo-key --before 2026-01-01T00:00:00Z\n  chatgate revoke user alice --api-key demo-key --clear"
    )]
    User(RevokeUserArgs),
    /// Revoke every user token of the app issued before a time (default: now), or clear that.
    #[command(
        after_help = "Examples:\n  chatgate revoke app --api-key demo-key\n  chatgate revoke app --api-key demo-key --before \"2026-01-01 12:00:00\"\n  chatgate revoke app --api-key demo-key --clear"
    )]
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
    /// The running proxy refused or failed the revocation request.
    #[error("the proxy on {address} answered {status}: {body}")]
    ProxyRefused {
        /// `[server] listen`.
        address: std::net::SocketAddr,
        /// The HTTP status.
        status: u16,
        /// The answer's body (a Stream error JSON from chatgate, or the upstream's).
        body: String,
    },
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
pub fn main(purge_delay: i64) -> ExitCode {
    run(Cli::parse(), purge_delay)
}

/// Runs a parsed command line; `purge_delay` is the allocator's (ms), for `serve`'s
/// startup log.
pub fn run(cli: Cli, purge_delay: i64) -> ExitCode {
    let result = match cli.command {
        Command::Token(TokenCommand::Create(args)) => create_token(&args).map(|t| println!("{t}")),
        Command::Token(TokenCommand::Inspect(args)) => inspect_token(&args),
        Command::Config(ConfigCommand::Check { file, newer }) => {
            check_config(&file, newer.as_deref())
        }
        Command::Serve(args) => serve(&args, purge_delay).map_err(CliError::from),
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

fn check_config(file: &std::path::Path, newer: Option<&std::path::Path>) -> Result<(), CliError> {
    let snapshot = check_one(file)?;
    if let Some(newer) = newer {
        let next = check_one(newer)?;
        let changes = snapshot.changes_to(&next);
        if changes.is_empty() {
            println!(
                "a reload from {} to {} changes nothing",
                file.display(),
                newer.display()
            );
        } else {
            println!(
                "a reload from {} to {} changes:",
                file.display(),
                newer.display()
            );
            for change in changes {
                println!("  {change}");
            }
        }
    }
    Ok(())
}

/// Loads one file, prints its summary and its warnings (stderr, exit status kept).
fn check_one(file: &std::path::Path) -> Result<ConfigSnapshot, CliError> {
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
    for warning in snapshot.warnings() {
        eprintln!("warning: {}: {warning}", file.display());
    }
    Ok(snapshot)
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
    let cutoff = if args.clear {
        None
    } else {
        Some(revoke_cutoff(args.before.as_deref())?)
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let through = runtime.block_on(async {
        // The memory store lives inside the running proxy and an embedded file is
        // locked by it: either way the change has to go through that proxy, as the
        // API's own PATCH, so its cache and its store see it at once.
        let held = match snapshot.revocation.store {
            chatgate::config::StoreKind::Memory => Some(CliError::MemoryStore {
                config: args.config.clone(),
                path: if target.is_some() { "users" } else { "app" },
                api_key: args.api_key.clone(),
            }),
            _ => match open_cli_store(&snapshot.revocation, &app.api_key, target).await {
                Ok(store) => {
                    write_to_store(&*store, &app.api_key, target, cutoff).await?;
                    None
                }
                Err(locked @ CliError::StoreLocked(_)) => Some(locked),
                Err(other) => return Err(other),
            },
        };
        let Some(held) = held else {
            return Ok(None);
        };
        match revoke_through_proxy(&snapshot, &app, target, cutoff).await {
            Ok(address) => Ok(Some(address)),
            // Nobody listens: the recipe in `held` is all that can be said.
            Err(ProxyCall::Unreachable) => Err(held),
            Err(ProxyCall::Failed(error)) => Err(error),
        }
    })?;
    let whose = match target {
        Some(user) => format!("user {user:?} of app {:?}", &*app.api_key),
        None => format!("every user of app {:?}", &*app.api_key),
    };
    let store = match through {
        Some(address) => format!(
            "through the running proxy on {address}, {}",
            describe_store(&snapshot.revocation)
        ),
        None => describe_store(&snapshot.revocation),
    };
    Ok(match cutoff {
        Some(cutoff) => format!(
            "revoked tokens of {whose} issued before {} ({store})",
            cutoff.to_rfc3339()
        ),
        None => format!("cleared the revocation cutoff of {whose} ({store})"),
    })
}

async fn write_to_store(
    store: &dyn chatgate::revocation::RevocationStore,
    api_key: &str,
    target: Option<&str>,
    cutoff: Option<chatgate::time::Cutoff>,
) -> Result<(), CliError> {
    let write = async {
        match target {
            Some(user) => {
                let change = chatgate::revocation::UserCutoffChange {
                    user_id: user.to_owned(),
                    cutoff,
                };
                store
                    .set_user_cutoffs(api_key, std::slice::from_ref(&change))
                    .await
            }
            None => store.set_app_cutoff(api_key, cutoff).await,
        }
    };
    match tokio::time::timeout(CLI_STORE_TIMEOUT, write).await {
        Ok(written) => written.map_err(CliError::from),
        Err(_) => Err(CliError::StoreTimeout),
    }
}

/// Why [`revoke_through_proxy`] did not apply the change.
enum ProxyCall {
    /// Nothing accepted a connection on `[server] listen`.
    Unreachable,
    /// The proxy answered, but not with success (or the exchange broke off).
    Failed(CliError),
}

/// Sends the revocation as the API's `PATCH /users` or `PATCH /app` to the proxy on
/// `[server] listen`, with a one-minute server token minted from the app's secret.
/// chatgate applies the cutoff durably before it forwards the request, so the answer
/// is the proof. hyper's client, already in the tree through the proxy, speaks the
/// HTTP/1.1 (a hand-written request would have to parse chunked answers itself).
async fn revoke_through_proxy(
    snapshot: &ConfigSnapshot,
    app: &App,
    target: Option<&str>,
    cutoff: Option<chatgate::time::Cutoff>,
) -> Result<std::net::SocketAddr, ProxyCall> {
    let mut address = snapshot.server.listen;
    if address.ip().is_unspecified() {
        address.set_ip(match address {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let failed = |message: String| {
        ProxyCall::Failed(CliError::ProxyRefused {
            address,
            status: 0,
            body: message,
        })
    };
    let stream = match tokio::time::timeout(
        CLI_STORE_TIMEOUT,
        tokio::net::TcpStream::connect(address),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(_)) | Err(_) => return Err(ProxyCall::Unreachable),
    };
    let when = cutoff.map_or(serde_json::Value::Null, |c| c.to_rfc3339().into());
    let (path, body) = match target {
        Some(user) => (
            "users",
            serde_json::json!({"users": [{"id": user, "set": {"revoke_tokens_issued_before": when}}]}),
        ),
        None => (
            "app",
            serde_json::json!({"revoke_tokens_issued_before": when}),
        ),
    };
    let token = TokenBuilder::server()
        .expires_in(Duration::from_secs(60))
        .sign(app.signing_secret());
    let api_key: String = form_urlencoded::byte_serialize(app.api_key.as_bytes()).collect();
    let request = http::Request::patch(format!("/{path}?api_key={api_key}"))
        .header(http::header::HOST, address.to_string())
        .header(http::header::AUTHORIZATION, token)
        .header("stream-auth-type", "jwt")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .map_err(|e| failed(e.to_string()))?;
    let exchange = async {
        match &snapshot.server.tls {
            None => send_over(stream, request).await,
            Some(tls) => send_over(tls_to_proxy(stream, tls).await?, request).await,
        }
    };
    let (status, body) = tokio::time::timeout(CLI_STORE_TIMEOUT, exchange)
        .await
        .map_err(|_| failed("no answer within 10 s".into()))?
        .map_err(failed)?;
    if (200..300).contains(&status) {
        Ok(address)
    } else {
        Err(ProxyCall::Failed(CliError::ProxyRefused {
            address,
            status,
            body,
        }))
    }
}

/// TLS to the running proxy's `[server.tls]` listener, trusting exactly the certificate
/// the config names (the proxy presents the pair of its live config, so after a
/// rotation and SIGHUP the file and the proxy agree): the listener may sit on a loopback
/// address no public certificate names.
async fn tls_to_proxy(
    stream: tokio::net::TcpStream,
    tls: &chatgate::config::TlsSettings,
) -> Result<pingora::tls::tokio_ssl::SslStream<tokio::net::TcpStream>, String> {
    use pingora::tls::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut connector = SslConnector::builder(SslMethod::tls()).map_err(|e| e.to_string())?;
    // Checked by hand below against the configured leaf, which no CA store holds.
    connector.set_verify(SslVerifyMode::NONE);
    connector
        .set_alpn_protos(b"\x08http/1.1")
        .map_err(|e| e.to_string())?;
    let ssl = connector
        .build()
        .configure()
        .and_then(|c| c.into_ssl("localhost"))
        .map_err(|e| e.to_string())?;
    let mut stream =
        pingora::tls::tokio_ssl::SslStream::new(ssl, stream).map_err(|e| e.to_string())?;
    std::pin::Pin::new(&mut stream)
        .connect()
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let expected = tls
        .certified_key()
        .leaf
        .to_der()
        .map_err(|e| e.to_string())?;
    let presented = stream
        .ssl()
        .peer_certificate()
        .and_then(|c| c.to_der().ok());
    if presented.as_deref() != Some(expected.as_slice()) {
        return Err(format!(
            "the proxy's certificate is not the one in {} (reload it with SIGHUP first)",
            tls.cert_file.display()
        ));
    }
    Ok(stream)
}

/// One HTTP/1.1 exchange on `stream`: the status and the trimmed body.
async fn send_over<S>(
    stream: S,
    request: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<(u16, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt as _;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).trim().to_owned()))
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
        StoreKind::Redis => format!(
            "store: redis {}",
            chatgate::config::redact_url(&settings.redis_url)
        ),
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

    /// `[server] listen` on a loopback port nothing listens on: `revoke` tries the
    /// running proxy there, and must not find one of another test or program.
    fn closed_listen() -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n")
    }

    fn config_file() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            closed_listen()
                + "[revocation]\nstore = \"memory\"\n[[apps]]\napi_key = \"k\"\nsecrets = [\"s\"]\n",
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
            closed_listen()
                + "[revocation]\nstore = \"embedded\"\npath = \"revocations.db\"\n\
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
