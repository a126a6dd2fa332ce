//! Encrypted files: each file is sealed on this device under its own key (see
//! [`fumi_core::attachment`]), uploaded as an opaque blob in resumable chunks, and announced in an
//! MLS message that carries the key and digest. Receivers download with `Range` resumption,
//! check every chunk, the length and the digest, and only then keep the file.
//!
//! Memory stays constant whatever the file size: files are encrypted and decrypted through
//! buffered streams, uploads go out in [`UPLOAD_CHUNK_BYTES`] pieces, downloads are written as
//! they arrive.

use fumi_proto::endpoints;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use fumi_core::attachment::sanitize_file_name;
use fumi_core::attachment::{self, AttachmentError, AttachmentKey, Sealed};
use fumi_core::store::ClientStore;
use fumi_core::{Attachment, Body};
use fumi_proto::*;

use crate::store::{FileView, create_private_dir, open_private};
use crate::{ClientError, FumiClient};

/// Bytes per upload request; a broken connection costs at most this much again.
pub const UPLOAD_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Consecutive failed attempts before a transfer gives up (it resumes on the next run).
const TRANSFER_ATTEMPTS: u32 = 8;
const IO_BUFFER_BYTES: usize = 256 * 1024;

/// Reports transfer progress (the CLI draws a progress bar).
pub trait Progress {
    /// A transfer of `total` bytes starts.
    fn begin(&self, label: &str, total: u64);
    /// `done` of the bytes are through.
    fn set(&self, done: u64);
    /// The transfer ended.
    fn end(&self);
    /// Something the user should know (a dropped connection, a resumption).
    fn note(&self, message: &str);
}

/// Progress that is not shown.
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: &str, _: u64) {}
    fn set(&self, _: u64) {}
    fn end(&self) {}
    fn note(&self, message: &str) {
        tracing::info!("{message}");
    }
}

/// Why a download did not produce a file.
pub(crate) enum DownloadFailure {
    /// Worth trying again later (network, server busy).
    Retry(ClientError),
    /// Will never succeed: the file was altered, truncated or is gone.
    Refused(String),
    /// Worth trying again, from the first byte (what was saved cannot be continued).
    StartOver(ClientError),
}

/// Collects sealed bytes into upload-sized chunks and hands each to the uploader.
struct ChunkSender {
    chunks: tokio::sync::mpsc::Sender<Bytes>,
    buffer: Vec<u8>,
}

impl ChunkSender {
    fn send(&mut self) -> std::io::Result<()> {
        let full = std::mem::replace(&mut self.buffer, Vec::with_capacity(UPLOAD_CHUNK_BYTES));
        self.chunks
            .blocking_send(Bytes::from(full))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let room = UPLOAD_CHUNK_BYTES - self.buffer.len();
        let taken = bytes.len().min(room);
        self.buffer.extend_from_slice(&bytes[..taken]);
        if self.buffer.len() == UPLOAD_CHUNK_BYTES {
            self.send()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buffer.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

/// Reads the sealed chunks a download hands over, appending each to the part file first (no
/// fsync: it only saves refetching after an interruption); end of input when the sender is
/// dropped.
struct ChunkReader {
    chunks: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
    saved: File,
}

impl Read for ChunkReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(chunk) => {
                    self.saved.write_all(&chunk)?;
                    self.current = chunk;
                }
                None => return Ok(0),
            }
        }
        let n = buffer.len().min(self.current.len());
        buffer[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// Deletes a temporary file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

impl FumiClient {
    /// Where received files are saved.
    pub fn files_dir(&self) -> PathBuf {
        self.home.join("files")
    }

    fn temp_dir(&self) -> Result<PathBuf, ClientError> {
        let dir = self.home.join("tmp");
        create_private_dir(&dir)?;
        Ok(dir)
    }

    /// Encrypts a file, uploads it and sends it into a conversation.
    pub(crate) async fn send_file_into(
        &mut self,
        group: GroupId,
        path: &Path,
        caption: Option<&str>,
    ) -> Result<MessageId, ClientError> {
        check_caption(caption)?;
        let me = self.account.device_id;
        let recipients: Vec<DeviceId> = self
            .device
            .members(group)?
            .into_iter()
            .map(|m| m.device)
            .filter(|d| *d != me)
            .collect();
        if recipients.is_empty() {
            return Err(ClientError::Usage(
                "no one else is in this conversation to receive the file".into(),
            ));
        }
        let (attachment, view) = self
            .seal_and_upload(path, |size| BlobCreate {
                size,
                recipients,
                channel: None,
            })
            .await?;
        let body = Body::File {
            attachment,
            caption: caption.map(str::to_owned).filter(|c| !c.trim().is_empty()),
        };
        self.send_content_with(group, body, Some(view)).await
    }

    /// Encrypts a file under a fresh key while uploading it as the blob `create` describes
    /// (given the sealed size); returns what opens it and what history shows of it.
    pub(crate) async fn seal_and_upload(
        &self,
        path: &Path,
        create: impl FnOnce(u64) -> BlobCreate,
    ) -> Result<(Attachment, FileView), ClientError> {
        let unreadable = |e: std::io::Error| ClientError::Usage(format!("cannot read {}: {e}", path.display()));
        let metadata = fs::metadata(path).map_err(unreadable)?;
        if !metadata.is_file() {
            return Err(ClientError::Usage(format!("{} is not a file", path.display())));
        }
        let name = sanitize_file_name(&path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        let size = metadata.len();
        let original = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let ciphertext_size = attachment::ciphertext_size(size);
        let create = create(ciphertext_size);

        // The same file for the same request, interrupted before: go on with its key and nonces.
        let modified = metadata
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        let upload_path = original.display().to_string();
        let purpose = crate::sha256(
            &[
                serde_json::to_vec(&create).expect("a blob request serialises"),
                size.to_be_bytes().to_vec(),
                modified.to_be_bytes().to_vec(),
            ]
            .concat(),
        );
        let resumed = match self.store.pending_upload(&upload_path, &purpose)? {
            None => None,
            Some(pending) => match self
                .transport
                .request::<(), BlobUploadStatus>(endpoints::BLOB_UPLOAD_STATUS, &[&pending.blob], None)
                .await
            {
                Ok(status) if status.size == ciphertext_size => {
                    Some((pending.blob, pending.file_key, pending.nonce_seed, status.received))
                }
                // Gone (expired, collected) or not ours: start again.
                Ok(_) | Err(ClientError::Server { status: 400..=499, .. }) => {
                    self.store.forget_pending_upload(&upload_path, &purpose)?;
                    None
                }
                Err(e) => return Err(e),
            },
        };
        let (key, nonce_seed) = match &resumed {
            Some((_, key, seed, _)) => (AttachmentKey::from_bytes(*key), *seed),
            None => (AttachmentKey::generate(&mut rand::rng()), crate::random_bytes()),
        };
        // Encryption runs on a blocking thread and hands sealed chunks to the upload as they
        // are ready: both cores work, and no sealed copy of the file is written to disk.
        let (chunks, mut ready) = tokio::sync::mpsc::channel::<Bytes>(2);
        let encryptor = {
            let (path, key) = (path.to_path_buf(), key.clone());
            tokio::task::spawn_blocking(move || {
                let mut source = BufReader::with_capacity(IO_BUFFER_BYTES, File::open(&path)?);
                let mut sink = ChunkSender {
                    chunks,
                    buffer: Vec::with_capacity(UPLOAD_CHUNK_BYTES),
                };
                // Nonces from a seed kept with the upload: encrypting again gives the same bytes.
                let mut nonces = <rand::rngs::StdRng as rand::SeedableRng>::from_seed(nonce_seed);
                let sealed = attachment::encrypt(&key, &mut source, size, &mut sink, &mut nonces)?;
                sink.flush()?;
                Ok::<_, AttachmentError>(sealed)
            })
        };
        let remember = |blob: BlobId| {
            Ok(self.store.save_pending_upload(
                &upload_path,
                &purpose,
                blob,
                key.as_bytes(),
                &nonce_seed,
                crate::now_ms(),
            )?)
        };
        let resume = resumed.map(|(blob, _, _, received)| (blob, received));
        let uploaded = self.upload(&mut ready, create, &name, resume, remember).await;
        drop(ready);
        let encrypted = encryptor
            .await
            .map_err(|e| ClientError::Store(format!("encryption task: {e}")))?;
        let sealed = match (uploaded, encrypted) {
            (_, Err(AttachmentError::Io(e))) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(unreadable(e));
            }
            (_, Err(e @ AttachmentError::SourceChanged)) => {
                return Err(ClientError::Usage(format!("{}: {e}", path.display())));
            }
            (Err(e), _) => return Err(e),
            (Ok(_), Err(e)) => return Err(ClientError::Usage(format!("{}: {e}", path.display()))),
            (Ok(blob), Ok(sealed)) => (blob, sealed),
        };
        let (blob, sealed) = sealed;
        self.store.forget_pending_upload(&upload_path, &purpose)?;

        let original = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let attachment = Attachment {
            blob,
            key: *key.as_bytes(),
            digest: sealed.digest,
            size,
            media_type: attachment::media_type_for(&name).to_owned(),
            name,
        };
        let view = FileView {
            name: attachment.name.clone(),
            size,
            media_type: attachment.media_type.clone(),
            path: Some(original.display().to_string()),
            error: None,
        };
        Ok((attachment, view))
    }

    /// Uploads sealed chunks as they arrive; after a failure resumes from the server's offset.
    /// With `resume`, goes on with that blob from the byte the server holds (the chunks still
    /// come from the start; those it has are skipped); otherwise creates the blob and hands its
    /// id to `remember` before the first byte is sent.
    pub(crate) async fn upload(
        &self,
        ready: &mut tokio::sync::mpsc::Receiver<Bytes>,
        create: BlobCreate,
        label: &str,
        resume: Option<(BlobId, u64)>,
        remember: impl FnOnce(BlobId) -> Result<(), ClientError>,
    ) -> Result<BlobId, ClientError> {
        let size = create.size;
        let (blob, held) = match resume {
            Some((blob, held)) => {
                self.progress
                    .note(&format!("resuming the upload of {label} at byte {held} of {size}"));
                (blob, held)
            }
            None => {
                let created: BlobCreated = self
                    .transport
                    .request(endpoints::CREATE_BLOB, &[], Some(&create))
                    .await
                    .map_err(|e| match e {
                        ClientError::Server {
                            status: 413, message, ..
                        } => ClientError::Usage(message),
                        other => other,
                    })?;
                remember(created.blob_id)?;
                (created.blob_id, 0)
            }
        };
        self.progress.begin(&format!("sending {label}"), size);
        let mut start = 0u64;
        let result = async {
            while let Some(chunk) = ready.recv().await {
                let end = start + chunk.len() as u64;
                if end > held {
                    let skip = held.saturating_sub(start);
                    self.upload_chunk(blob, start + skip, chunk.slice(skip as usize..), size)
                        .await?;
                }
                start = end;
                self.progress.set(start);
            }
            if start != size {
                return Err(ClientError::Usage("the file could not be read to its end".into()));
            }
            Ok(blob)
        }
        .await;
        self.progress.end();
        result
    }

    /// Uploads one chunk that starts at `start`, resuming inside it after a dropped connection.
    async fn upload_chunk(&self, blob: BlobId, start: u64, chunk: Bytes, size: u64) -> Result<(), ClientError> {
        let end = start + chunk.len() as u64;
        let mut offset = start;
        let mut failures = 0u32;
        while offset < end {
            let piece = chunk.slice((offset - start) as usize..);
            match self.transport.upload_chunk(blob, offset, piece).await {
                Ok(status) => offset = status.received,
                Err(e) if retryable(&e) && failures + 1 < TRANSFER_ATTEMPTS => {
                    failures += 1;
                    tokio::time::sleep(backoff(failures)).await;
                    // Where to go on: the server keeps what reached it before the break.
                    if let Ok(status) = self
                        .transport
                        .request::<(), BlobUploadStatus>(endpoints::BLOB_UPLOAD_STATUS, &[&blob], None)
                        .await
                    {
                        self.progress.note(&format!(
                            "upload interrupted ({e}); resuming at byte {} of {size}",
                            status.received
                        ));
                        offset = status.received;
                    }
                }
                Err(e) => return Err(e),
            }
            if offset < start || offset > end {
                return Err(ClientError::Protocol(format!(
                    "the server reports {offset} bytes of an upload expected between {start} and {end}"
                )));
            }
        }
        Ok(())
    }

    /// Downloads every queued file; a file refused for good is marked so in history.
    pub(crate) async fn download_pending(&mut self) -> Result<(), ClientError> {
        for (local_id, attachment) in self.store.downloads()? {
            // Another fumi process on this home may be fetching the same file: one at a time,
            // and only while it is still queued.
            let lock_path = self.temp_dir()?.join(format!("{}.lock", attachment.blob));
            let lock = open_private(&lock_path, true).map_err(local)?;
            if lock.try_lock().is_err() || !self.store.is_download_pending(attachment.blob)? {
                continue;
            }
            let Some(view) = self.fetch_file(&attachment).await else {
                continue;
            };
            self.store.transaction(|| {
                self.store.set_file_view(local_id, &view)?;
                Ok(self.store.remove_download(attachment.blob)?)
            })?;
            // Done with the blob either way: the server may delete it once every recipient is.
            if let Err(e) = self
                .transport
                .request::<(), ()>(endpoints::ACK_BLOB, &[&attachment.blob], None)
                .await
            {
                tracing::debug!(error = %e, "blob acknowledgement not taken");
            }
            let _ = fs::remove_file(&lock_path);
            drop(lock);
        }
        Ok(())
    }

    /// Downloads a file: where it was saved, or why it was refused for good; `None` if it is
    /// worth trying again later.
    pub(crate) async fn fetch_file(&self, attachment: &Attachment) -> Option<FileView> {
        let mut view = FileView::pending(attachment);
        match self.download(attachment).await {
            Ok(path) => view.path = Some(path.display().to_string()),
            Err(DownloadFailure::Refused(reason)) => view.error = Some(reason),
            Err(DownloadFailure::Retry(e) | DownloadFailure::StartOver(e)) => {
                tracing::warn!(error = %e, "a file could not be downloaded now; it will be tried again");
                return None;
            }
        }
        Some(view)
    }

    pub(crate) async fn download(&self, attachment: &Attachment) -> Result<PathBuf, DownloadFailure> {
        let temp = self.temp_dir().map_err(DownloadFailure::Retry)?;
        let part = temp.join(format!("{}.download", attachment.blob));
        let expected = attachment::ciphertext_size(attachment.size);
        let files = self.files_dir();
        create_private_dir(&files).map_err(DownloadFailure::Retry)?;
        let plain = TempFile(files.join(format!(".{}.partial", attachment.blob)));
        // What an earlier, interrupted run saved; anything longer than the blob is junk.
        let resume_from = match tokio::fs::metadata(&part).await {
            Ok(meta) if meta.len() <= expected => meta.len(),
            _ => 0,
        };

        // A blocking thread does all the file work: it replays the saved prefix, then appends
        // each arriving piece to the part file (for the next run's resumption) and decrypts.
        let (feed, arriving) = tokio::sync::mpsc::channel::<Bytes>(4);
        let decryptor = {
            let key = AttachmentKey::from_bytes(attachment.key);
            let sealed = Sealed {
                digest: attachment.digest,
                plaintext_size: attachment.size,
                ciphertext_size: expected,
            };
            let (part, plain) = (part.clone(), plain.0.clone());
            tokio::task::spawn_blocking(move || {
                let saved = open_private(&part, true)?;
                saved.set_len(resume_from)?;
                let mut source = File::open(&part)?.take(resume_from).chain(ChunkReader {
                    chunks: arriving,
                    current: Bytes::new(),
                    saved,
                });
                let mut sink = BufWriter::with_capacity(IO_BUFFER_BYTES, open_private(&plain, false)?);
                attachment::decrypt(&key, &mut source, &sealed, &mut sink)?;
                sink.flush()?;
                Ok::<_, AttachmentError>(())
            })
        };
        let fetched = self.fetch_blob(attachment, resume_from, expected, feed).await;
        let decrypted = decryptor
            .await
            .map_err(|e| DownloadFailure::Retry(ClientError::Store(format!("decryption task: {e}"))))?;
        let refused = |e: AttachmentError| {
            DownloadFailure::Refused(format!("refused {}: {e}; it was not saved", attachment.name))
        };
        let outcome = match (fetched, decrypted) {
            // A failed chunk is reported as soon as it arrives, before the rest is fetched.
            (_, Err(e @ (AttachmentError::Tampered | AttachmentError::UnknownFormat(_)))) => Err(refused(e)),
            (Err(failure), _) => Err(failure),
            (Ok(()), Err(AttachmentError::Io(e))) => Err(DownloadFailure::Retry(local(e))),
            (Ok(()), Err(e)) => Err(refused(e)),
            (Ok(()), Ok(())) => Ok(()),
        };
        match outcome {
            // Keep what arrived: the next run resumes from there.
            Err(DownloadFailure::Retry(e)) => return Err(DownloadFailure::Retry(e)),
            Err(DownloadFailure::StartOver(e)) => {
                let _ = fs::remove_file(&part);
                return Err(DownloadFailure::Retry(e));
            }
            other => {
                let _ = fs::remove_file(&part);
                other?
            }
        }
        let target = unique_path(&files, &sanitize_file_name(&attachment.name));
        fs::rename(&plain.0, &target).map_err(|e| DownloadFailure::Retry(local(e)))?;
        Ok(target)
    }

    /// Fetches a blob from byte `offset` on and hands every piece to `feed`; a closed feed (the
    /// decryptor refused a chunk) ends the fetch early. Resumes with `Range` after a break.
    async fn fetch_blob(
        &self,
        attachment: &Attachment,
        mut offset: u64,
        expected: u64,
        feed: tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<(), DownloadFailure> {
        let refused = |e: AttachmentError| {
            DownloadFailure::Refused(format!("refused {}: {e}; it was not saved", attachment.name))
        };
        self.progress.begin(&format!("receiving {}", attachment.name), expected);
        self.progress.set(offset);
        let mut failures = 0u32;
        let result = 'fetch: loop {
            if offset >= expected {
                break Ok(());
            }
            let mut response = match self.transport.download(attachment.blob, offset).await {
                Ok(response) => response,
                Err(ClientError::Server { status: 404, .. }) => {
                    break Err(DownloadFailure::Refused(format!(
                        "{} is no longer on the server (it expired or was deleted)",
                        attachment.name
                    )));
                }
                Err(ClientError::Server { status: 403, .. }) => {
                    break Err(DownloadFailure::Refused(format!(
                        "the server does not let this device download {}",
                        attachment.name
                    )));
                }
                Err(e) if retryable(&e) && failures + 1 < TRANSFER_ATTEMPTS => {
                    failures += 1;
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
                Err(e) => break Err(DownloadFailure::Retry(e)),
            };
            if response.status() == reqwest::StatusCode::OK && offset > 0 {
                break Err(DownloadFailure::StartOver(ClientError::Protocol(
                    "the server ignored the download range".into(),
                )));
            }
            let interrupted = loop {
                match response.chunk().await {
                    Ok(Some(bytes)) => {
                        if offset + bytes.len() as u64 > expected {
                            break 'fetch Err(refused(AttachmentError::TooLong));
                        }
                        offset += bytes.len() as u64;
                        self.progress.set(offset);
                        if feed.send(bytes).await.is_err() {
                            // The decryptor refused what it got: no use fetching the rest.
                            break None;
                        }
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            match interrupted {
                // The server sent all it has: fewer bytes than announced is a truncated blob.
                None if offset < expected => break Err(refused(AttachmentError::Truncated)),
                None => {}
                Some(e) if failures + 1 < TRANSFER_ATTEMPTS => {
                    failures += 1;
                    self.progress
                        .note(&format!("download interrupted ({e}); resuming at byte {offset}"));
                    tokio::time::sleep(backoff(failures)).await;
                }
                Some(e) => break Err(DownloadFailure::Retry(ClientError::Network(e.to_string()))),
            }
        };
        self.progress.end();
        result
    }
}

fn local(e: std::io::Error) -> ClientError {
    ClientError::Store(format!("local file: {e}"))
}

fn retryable(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Network(_)
            | ClientError::Server {
                status: 409 | 429 | 500..,
                ..
            }
    )
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(200 * 2u64.pow(failures.min(5)))
}

/// `dir/name`, or `dir/stem (2).ext` and so on if that exists.
fn unique_path(dir: &Path, name: &str) -> PathBuf {
    let candidate = dir.join(name);
    if !candidate.exists() {
        return candidate;
    }
    let (stem, extension) = match name.rsplit_once('.') {
        Some((stem, extension)) if !stem.is_empty() => (stem, format!(".{extension}")),
        _ => (name, String::new()),
    };
    (2..)
        .map(|n| dir.join(format!("{stem} ({n}){extension}")))
        .find(|p| !p.exists())
        .expect("some name is free")
}

/// Refuses a caption longer than a text message may be.
pub(crate) fn check_caption(caption: Option<&str>) -> Result<(), ClientError> {
    match caption {
        Some(caption) if caption.len() > fumi_core::content::MAX_TEXT_BYTES => Err(ClientError::Usage(
            fumi_core::content::ContentError::TooLong.to_string(),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_cannot_escape_the_files_directory() {
        assert_eq!(sanitize_file_name("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(sanitize_file_name(".bashrc"), "bashrc");
        assert_eq!(sanitize_file_name(""), "file");
        assert_eq!(sanitize_file_name("a\nb"), "a_b");
        assert_eq!(sanitize_file_name("scan.pdf"), "scan.pdf");
        assert!(sanitize_file_name(&"é".repeat(300)).len() <= 255);
    }

    #[test]
    fn saved_files_do_not_overwrite_each_other() {
        let dir = tempfile_dir();
        let first = unique_path(&dir, "scan.pdf");
        fs::write(&first, b"1").unwrap();
        let second = unique_path(&dir, "scan.pdf");
        assert_eq!(second, dir.join("scan (2).pdf"));
        fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fumi-files-test-{}", hex::encode(crate::random_bytes::<8>())));
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
