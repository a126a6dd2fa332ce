//! Reporting a received message for abuse: its franking evidence, sealed to the server's
//! moderation key, so the server stores a report only the moderators can open.

use fumi_core::franking::{MAX_COMMENT_BYTES, REPORT_VERSION, Report};
use fumi_proto::endpoints;
use fumi_proto::{MessageId, ModerationKey, ReportFiled, ReportSubmit};
use openmls_traits::OpenMlsProvider;

use crate::{ClientError, FumiClient, now_ms};

impl FumiClient {
    /// Reports the received message `message` (its id as `receive --json` and `history --json`
    /// print it) with the reporter's `comment`; returns the report's number on the server.
    pub async fn report(&self, message: &str, comment: &str) -> Result<u64, ClientError> {
        if comment.len() > MAX_COMMENT_BYTES {
            return Err(ClientError::Usage(format!(
                "a report comment is at most {MAX_COMMENT_BYTES} bytes"
            )));
        }
        let id = MessageId::parse(message)
            .map_err(|_| ClientError::Usage("a message id is 32 hex digits (see `fumi history NAME --json`)".into()))?;
        let evidence = self.store.franking_evidence(id)?.ok_or_else(|| {
            ClientError::Usage(
                "no received message with that id on this device (only messages others sent you can be reported)"
                    .into(),
            )
        })?;
        let key: ModerationKey = self
            .transport
            .request::<(), _>(endpoints::MODERATION_KEY, &[], None)
            .await?;
        let key: [u8; 32] = key
            .public_key
            .as_slice()
            .try_into()
            .map_err(|_| ClientError::Protocol("the moderation key is not 32 bytes".into()))?;
        let report = Report {
            v: REPORT_VERSION,
            evidence,
            reporter: self.account.account_id,
            comment: comment.to_owned(),
            reported_at: now_ms(),
        };
        let (signature_key, credential) = self.device.signing_identity();
        let sealed = report
            .seal(
                self.device.provider().crypto(),
                &key,
                &signature_key,
                &credential,
                |message| self.device.sign_labelled(message).ok(),
            )
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let filed: ReportFiled = self
            .transport
            .request(
                endpoints::FILE_REPORT,
                &[],
                Some(&ReportSubmit { sealed: sealed.into() }),
            )
            .await?;
        Ok(filed.id)
    }
}
