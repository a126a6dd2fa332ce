//! The bytes of encrypted attachments. Uploads arrive in pieces (resumable after a dropped
//! connection) into a local staging file; a complete upload is moved into the blob store,
//! an `object_store` (local filesystem by default), from which downloads are served with ranges.
//!
//! Bookkeeping (owner, size, recipients, expiry) lives in [`crate::storage`]; this module only
//! moves opaque bytes.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use fumi_proto::BlobId;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::Config;

const READ_CHUNK_BYTES: usize = 1024 * 1024;
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The upload does not continue where the server's copy ends.
    #[error("upload offset mismatch: the server holds {held} bytes")]
    OffsetMismatch {
        /// Bytes the server holds.
        held: u64,
    },
    /// The upload carried more bytes than announced.
    #[error("more bytes than the announced size")]
    Oversized,
    /// The blob's bytes are not in the store (deleted meanwhile).
    #[error("the blob's bytes are gone")]
    Missing,
    /// The blob store or the staging area failed.
    #[error("blob store: {0}")]
    Store(String),
}

/// Where blob bytes live.
pub struct BlobStore {
    staging: PathBuf,
    objects: Arc<dyn ObjectStore>,
    /// The directory behind `objects` when it is the local filesystem: finished uploads are
    /// renamed into it and served straight from it, instead of copied through `object_store`.
    local_root: Option<PathBuf>,
    /// Human description for the startup log.
    pub description: String,
}

impl BlobStore {
    /// Opens the configured store. `blob_store` empty: `<data>/blobs` on the local disk; a path
    /// or `file://` URL: that directory; `s3://bucket[/prefix]`: an S3-compatible service, with
    /// endpoint, region and credentials from the standard `AWS_*` environment variables
    /// (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_ALLOW_HTTP`, ...). Uploads are staged in `<data>/uploads` either way.
    pub fn open(config: &Config) -> Result<Self, BlobError> {
        Self::open_at(
            &config.blob_store,
            &config.data.join("blobs"),
            &config.data.join("uploads"),
        )
    }

    /// Opens the store at `location` (as `blob_store` in [`BlobStore::open`]; empty: the
    /// directory `default_root`), staging uploads in `staging`.
    pub fn open_at(
        location: &str,
        default_root: &std::path::Path,
        staging: &std::path::Path,
    ) -> Result<Self, BlobError> {
        let staging = staging.to_path_buf();
        std::fs::create_dir_all(&staging).map_err(|e| BlobError::Store(format!("{}: {e}", staging.display())))?;
        let location = location.trim();
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(BlobError::Store(format!(
                    "blob_store {location:?}: name the bucket, as in s3://bucket or s3://bucket/prefix"
                )));
            }
            let s3 = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| BlobError::Store(format!("blob_store {location:?}: {e}")))?;
            let endpoint = std::env::var("AWS_ENDPOINT").unwrap_or_else(|_| "AWS".into());
            let objects: Arc<dyn ObjectStore> = match prefix.trim_matches('/') {
                "" => Arc::new(s3),
                prefix => Arc::new(PrefixStore::new(s3, prefix)),
            };
            return Ok(Self {
                staging,
                objects,
                local_root: None,
                description: format!("S3 bucket {bucket} at {endpoint}"),
            });
        }
        let root = if location.is_empty() {
            default_root.to_path_buf()
        } else if location.contains("://") && !location.starts_with("file://") {
            return Err(BlobError::Store(format!(
                "unsupported blob store {location:?}: use a directory, file://DIR or s3://BUCKET[/PREFIX]"
            )));
        } else {
            PathBuf::from(location.trim_start_matches("file://"))
        };
        std::fs::create_dir_all(&root).map_err(|e| BlobError::Store(format!("{}: {e}", root.display())))?;
        let objects = LocalFileSystem::new_with_prefix(&root).map_err(store_error)?;
        Ok(Self {
            staging,
            objects: Arc::new(objects),
            local_root: Some(root.clone()),
            description: format!("local directory {}", root.display()),
        })
    }

    /// Checks at startup that the store answers (bucket exists, credentials work), so a wrong
    /// setting stops the server with a clear message instead of failing the first upload.
    pub async fn check(&self) -> Result<(), BlobError> {
        // A write and a delete: a missing bucket or read-only credentials fail here. Each
        // process probes its own object: nodes of a cluster starting together share the store.
        let probe = ObjectPath::from(format!(
            "blobs/.fumi-startup-check-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        let failed =
            |e: object_store::Error| BlobError::Store(format!("{} does not accept writes: {e}", self.description));
        self.objects
            .put(&probe, bytes::Bytes::from_static(b"fumi").into())
            .await
            .map_err(failed)?;
        self.objects.delete(&probe).await.map_err(failed)
    }

    fn staging_path(&self, id: BlobId) -> PathBuf {
        self.staging.join(format!("{id}.part"))
    }

    fn object_path(id: BlobId) -> ObjectPath {
        ObjectPath::from(format!("blobs/{id}"))
    }

    /// Bytes of an unfinished upload held so far.
    pub async fn received(&self, id: BlobId) -> Result<u64, BlobError> {
        match tokio::fs::metadata(self.staging_path(id)).await {
            Ok(meta) => Ok(meta.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(BlobError::Store(e.to_string())),
        }
    }

    /// Appends a request body that starts at `offset` to an upload of `size` bytes; returns
    /// the bytes held afterwards. Whatever arrived before a dropped connection is kept, so the
    /// client resumes from there.
    pub async fn append(&self, id: BlobId, offset: u64, size: u64, body: Body) -> Result<u64, BlobError> {
        // Checked before the file is created, so a refused request leaves nothing behind. (One
        // request at a time writes an upload: the caller holds its upload guard.)
        let held = self.received(id).await?;
        if held != offset {
            return Err(BlobError::OffsetMismatch { held });
        }
        let path = self.staging_path(id);
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .await
            .map_err(|e| BlobError::Store(e.to_string()))?;
        let mut file = tokio::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, file);
        file.seek(std::io::SeekFrom::Start(held))
            .await
            .map_err(|e| BlobError::Store(e.to_string()))?;
        let mut written = held;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else {
                // The client went away mid-body: keep what arrived; it will resume.
                break;
            };
            if written + chunk.len() as u64 > size {
                // Refuse the whole request: drop what is buffered, cut the file back to where
                // this request began.
                let file = file.into_inner();
                file.set_len(offset)
                    .await
                    .map_err(|e| BlobError::Store(e.to_string()))?;
                if offset == 0 {
                    drop(file);
                    let _ = tokio::fs::remove_file(&path).await;
                }
                return Err(BlobError::Oversized);
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| BlobError::Store(e.to_string()))?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(|e| BlobError::Store(e.to_string()))?;
        Ok(written)
    }

    /// Moves a complete upload into the blob store (durably) and drops the staging file.
    pub async fn finish(&self, id: BlobId) -> Result<(), BlobError> {
        let path = self.staging_path(id);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| BlobError::Store(e.to_string()))?;
        file.sync_all().await.map_err(|e| BlobError::Store(e.to_string()))?;
        if let Some(target) = self.local_path(id) {
            let parent = target.parent().expect("object paths have a directory");
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| BlobError::Store(e.to_string()))?;
            match tokio::fs::rename(&path, &target).await {
                Ok(()) => return Ok(()),
                // Another filesystem: copy below.
                Err(e) => tracing::debug!(error = %e, "staging and blob store differ; copying"),
            }
        }
        let mut writer = object_store::buffered::BufWriter::new(self.objects.clone(), Self::object_path(id));
        tokio::io::copy(&mut file, &mut writer)
            .await
            .map_err(|e| BlobError::Store(e.to_string()))?;
        writer.shutdown().await.map_err(|e| BlobError::Store(e.to_string()))?;
        tokio::fs::remove_file(&path)
            .await
            .map_err(|e| BlobError::Store(e.to_string()))
    }

    fn local_path(&self, id: BlobId) -> Option<PathBuf> {
        self.local_root
            .as_ref()
            .map(|root| root.join(Self::object_path(id).as_ref()))
    }

    /// Whether the blob store holds the finished blob.
    pub async fn stored(&self, id: BlobId) -> Result<bool, BlobError> {
        match self.objects.head(&Self::object_path(id)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_error(e)),
        }
    }

    /// The blob's bytes from `offset` on, and the stored size.
    pub async fn read(
        &self,
        id: BlobId,
        offset: u64,
    ) -> Result<(u64, BoxStream<'static, std::io::Result<Bytes>>), BlobError> {
        if let Some(path) = self.local_path(id) {
            let mut file = match tokio::fs::File::open(&path).await {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BlobError::Missing),
                Err(e) => return Err(BlobError::Store(e.to_string())),
            };
            let size = file
                .metadata()
                .await
                .map_err(|e| BlobError::Store(e.to_string()))?
                .len();
            file.seek(std::io::SeekFrom::Start(offset.min(size)))
                .await
                .map_err(|e| BlobError::Store(e.to_string()))?;
            // Large reads: one blocking-pool hop per 1 MiB rather than per 8 KiB.
            let stream = futures_util::stream::try_unfold(file, |mut file| async move {
                let mut buffer = vec![0u8; READ_CHUNK_BYTES];
                let n = file.read(&mut buffer).await?;
                if n == 0 {
                    return Ok(None);
                }
                buffer.truncate(n);
                Ok(Some((Bytes::from(buffer), file)))
            });
            return Ok((size, stream.boxed()));
        }
        let options = GetOptions {
            range: (offset > 0).then_some(GetRange::Offset(offset)),
            ..GetOptions::default()
        };
        let result = self
            .objects
            .get_opts(&Self::object_path(id), options)
            .await
            .map_err(store_error)?;
        // The stored size, not the announced one: a damaged store is served as it is, and the
        // receiver's length and digest checks refuse it with a clear error.
        let size = result.meta.size;
        Ok((
            size,
            result
                .into_stream()
                .map(|chunk| chunk.map_err(std::io::Error::other))
                .boxed(),
        ))
    }

    /// The size and SHA-256 of a finished blob's bytes, if the store holds them.
    pub async fn digest(&self, id: BlobId) -> Result<Option<(u64, [u8; 32])>, BlobError> {
        use sha2::Digest;
        let (_, mut stream) = match self.read(id, 0).await {
            Ok(read) => read,
            Err(BlobError::Missing) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BlobError::Store(e.to_string()))?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok(Some((size, hasher.finalize().into())))
    }

    /// Copies a finished blob's bytes from `source` into this store (replacing any partial copy
    /// a crash left), durably.
    pub async fn copy_from(&self, source: &BlobStore, id: BlobId) -> Result<(), BlobError> {
        let (_, mut stream) = source.read(id, 0).await?;
        if let Some(target) = self.local_path(id) {
            // Written beside and renamed into place, so a crash never leaves a short file there.
            let parent = target.parent().expect("object paths have a directory").to_path_buf();
            tokio::fs::create_dir_all(&parent)
                .await
                .map_err(|e| BlobError::Store(e.to_string()))?;
            let partial = parent.join(format!("{id}.copying"));
            let mut file = tokio::fs::File::create(&partial)
                .await
                .map_err(|e| BlobError::Store(e.to_string()))?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| BlobError::Store(e.to_string()))?;
                file.write_all(&chunk)
                    .await
                    .map_err(|e| BlobError::Store(e.to_string()))?;
            }
            file.sync_all().await.map_err(|e| BlobError::Store(e.to_string()))?;
            return tokio::fs::rename(&partial, &target)
                .await
                .map_err(|e| BlobError::Store(e.to_string()));
        }
        // An object store makes an upload visible only once it is complete.
        let mut writer = object_store::buffered::BufWriter::new(self.objects.clone(), Self::object_path(id));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BlobError::Store(e.to_string()))?;
            writer
                .write_all(&chunk)
                .await
                .map_err(|e| BlobError::Store(e.to_string()))?;
        }
        writer.shutdown().await.map_err(|e| BlobError::Store(e.to_string()))
    }

    /// Deletes a blob's bytes, finished or not. Missing bytes are not an error.
    pub async fn delete(&self, id: BlobId) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.staging_path(id)).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BlobError::Store(e.to_string())),
        }
        match self.objects.delete(&Self::object_path(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(e)),
        }
    }
}

fn store_error(error: object_store::Error) -> BlobError {
    match error {
        object_store::Error::NotFound { .. } => BlobError::Missing,
        other => BlobError::Store(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes of a cluster share one blob store and start together (a deploy, a restart): each
    /// one's startup check must pass whatever the others do meanwhile. (With one probe object
    /// for all, a node deleted another's probe and that node refused to start.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_starting_together_on_one_store_all_pass_the_check() {
        let shared = tempfile::tempdir().unwrap();
        let mut starts = Vec::new();
        for node in 0..8 {
            let staging = shared.path().join(format!("staging-{node}"));
            let store =
                BlobStore::open_at(shared.path().join("blobs").to_str().unwrap(), shared.path(), &staging).unwrap();
            starts.push(tokio::spawn(async move {
                for _ in 0..25 {
                    store.check().await?;
                }
                Ok::<_, BlobError>(())
            }));
        }
        for start in starts {
            start.await.unwrap().unwrap();
        }
    }
}
