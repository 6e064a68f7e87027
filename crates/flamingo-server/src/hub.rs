//! Downloading released checkpoints by manifest name from the Hugging Face hub.
