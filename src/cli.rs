//! The `chatgate` command line: `serve`, `token create|inspect`, `config check`,
//! `revoke`. The binary only calls [`main`]; everything here is testable library code.

use crate::config::{App, ConfigSnapshot};
use crate::token::{self, TokenBuilder};
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
    #[cfg(feature = "proxy")]
    Serve(crate::proxy::ServeArgs),
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
        #[cfg(feature = "proxy")]
        Command::Serve(args) => crate::proxy::serve(&args),
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
) -> Result<(ConfigSnapshot, std::sync::Arc<App>), String> {
    let snapshot = ConfigSnapshot::load(config).map_err(|e| e.to_string())?;
    let app = snapshot.app(api_key).cloned().ok_or_else(|| {
        let known: Vec<&str> = snapshot.apps().map(|a| &*a.api_key).collect();
        format!(
            "{}: no app with api_key {api_key:?} (configured: {})",
            config.display(),
            known.join(", ")
        )
    })?;
    Ok((snapshot, app))
}

/// `token create`: the token text.
pub fn create_token(args: &CreateArgs) -> Result<String, String> {
    let (_, app) = load_app(&args.config, &args.api_key)?;
    let mut builder = match &args.user {
        Some(user) if !user.is_empty() => TokenBuilder::user(user),
        Some(_) => return Err("--user must not be empty".into()),
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

fn inspect_token(args: &InspectArgs) -> Result<(), String> {
    let token = if args.token == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| e.to_string())?;
        text.trim().to_owned()
    } else {
        args.token.clone()
    };
    let loaded = match (&args.config, &args.api_key) {
        (Some(config), Some(api_key)) => Some(load_app(config, api_key)?),
        _ => None,
    };
    let report = token::inspect(
        &token,
        loaded
            .as_ref()
            .map(|(snapshot, app)| (&**app, &snapshot.auth)),
        crate::time::now_unix(),
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
        Err("the token would be rejected".into())
    } else {
        Ok(())
    }
}

fn check_config(file: &std::path::Path) -> Result<(), String> {
    let snapshot = ConfigSnapshot::load(file).map_err(|e| e.to_string())?;
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
        let verified =
            token::verify(&token, &app, &snapshot.auth, crate::time::now_unix()).unwrap();
        assert_eq!(verified.claims.user_id.as_deref(), Some("alice"));
        let exp = verified.claims.expires_at.unwrap();
        assert!((exp - crate::time::now_unix() - 3600).abs() <= 2);
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
}
