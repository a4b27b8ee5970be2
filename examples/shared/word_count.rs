//! The `word_count` job, shared by the `custom_worker` and `typed_producer` examples: one
//! definition of its arguments and kind for the producer and the worker, as a crate of your
//! own would share it.

use apiary::JobArgs;
use serde::{Deserialize, Serialize};

/// Count the words of `text`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CountWords {
    /// The text to count.
    pub text: String,
}

impl JobArgs for CountWords {
    const KIND: &'static str = "word_count";
}

/// What a `word_count` job returns.
#[derive(Debug, Serialize, Deserialize)]
pub struct Counted {
    /// How many words the text has.
    pub words: i64,
}
