//! The worker's one error type.

/// Everything that can stop the worker or fail a backplane operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("message log: {0}")]
    Store(String),
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the message log writer has stopped")]
    LogClosed,
    #[error("the message log is busy")]
    LogBusy,
    #[error("the message log is unavailable")]
    LogUnavailable,
    #[error("invalid configuration: {0}")]
    Config(String),
}

macro_rules! store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(e.to_string())
            }
        }
    )*};
}
store_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);
