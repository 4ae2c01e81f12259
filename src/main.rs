//! The `chatgate` binary: parses arguments and hands over to the library.

fn main() -> std::process::ExitCode {
    chatgate::cli::main()
}
