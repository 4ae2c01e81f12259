//! The `chatgate` binary: parses arguments and hands over to the library.

mod allocator;
mod cli;
mod inspect;
mod serve;

fn main() -> std::process::ExitCode {
    // Before anything allocates much: a process that cannot start a thread is better
    // told so now than after binding its ports.
    let purge_delay = match allocator::start_collector() {
        Ok(millis) => millis,
        Err(error) => {
            eprintln!("error: cannot start the allocator's collector thread: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    cli::main(purge_delay)
}
