//! `irqvm`: see `irqvm --help`.

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::from_env("IRQVM_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = irqvm::cli::Cli::parse();
    match irqvm::cli::main_with(cli) {
        Ok(status) => std::process::exit(status),
        Err(e) => {
            let mut message = e.to_string();
            eprintln!("irqvm: {message}");
            // Print the causes the message does not already include.
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                let text = cause.to_string();
                if !message.contains(&text) {
                    eprintln!("  caused by: {text}");
                }
                message = text;
                source = cause.source();
            }
            // 2: an error of the VMM itself (a guest's debug-exit status is always odd).
            std::process::exit(2);
        }
    }
}
