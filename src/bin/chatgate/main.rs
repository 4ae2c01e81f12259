//! The `chatgate` binary: parses arguments and hands over to the library.

mod allocator;
mod cli;
mod inspect;
mod serve;

fn main() -> std::process::ExitCode {
    let purge_delay = allocator::configure();
    cli::main(purge_delay)
}
