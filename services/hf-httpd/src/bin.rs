//! The `hf-httpd` binary; the server is the library (src/main.rs).

fn main() -> std::process::ExitCode {
    hf_httpd::main_from(std::env::args_os())
}
