//! The README's example: an upper-casing line service on holdfast.
//! `cargo run --example upper`, or under the keeper:
//! `holdfast run --listen 127.0.0.1:7000 -- target/debug/examples/upper`.

use holdfast::tokio::Listener;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> Result<(), holdfast::Error> {
    // ... load configuration, open files: a standby does this before it is needed.
    let mut listener = Listener::bind(&["127.0.0.1:7000".parse().unwrap()]).await?;
    while let Some(mut conn) = listener.accept().await? {
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                // Requests are lines; answer each with its upper-case copy.
                while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                    let answer = buf[..=end].to_ascii_uppercase();
                    conn.write_all(&answer).await?;
                    conn.commit(end + 1, &[]).await?; // request done: input consumed
                    buf.drain(..=end);
                }
                if conn.read_buf(&mut buf).await? == 0 {
                    return Ok::<_, std::io::Error>(());
                }
            }
        });
    }
    Ok(())
}
