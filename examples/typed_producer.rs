//! Enqueues a typed job and prints its result: the producer's half of the `custom_worker`
//! example. Configuration comes from the same environment variables as `apiary enqueue`.
//!
//! ```sh
//! cargo run --example custom_worker &
//! cargo run --example typed_producer -- "to be or not to be"
//! ```

#[path = "shared/word_count.rs"]
mod word_count;

use std::time::Duration;

use apiary::{Client, Config, JobStatus, TypedJob};
use word_count::{CountWords, Counted};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let text = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let client = Client::new(&Config::from_env()?)?; // connects on first use

    // The kind comes from CountWords; the options are this enqueue's own. Enqueueing the same
    // text again returns the first job instead of counting twice.
    let job = TypedJob::new(CountWords { text: text.clone() })
        .with_dedup_key(format!("count:{text}"))
        .with_max_attempts(3);
    let enqueued = client.enqueue(job).await?;
    println!("job {} (new: {})", enqueued.job.id, enqueued.created);

    let job = client
        .wait(enqueued.job.id, Duration::from_secs(30))
        .await?
        .ok_or("the job is gone")?;
    match job.status() {
        JobStatus::Succeeded => {
            let counted: Option<Counted> = job.result_as()?;
            println!("{counted:?}");
        }
        status => println!("{status}: {}", job.error.unwrap_or_default()),
    }
    Ok(())
}
