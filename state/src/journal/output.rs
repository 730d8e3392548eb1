//! Build output into the journal: log bytes, kept in a record when small and in the build's
//! segment otherwise, with how far the builder's output has been read.

use super::{INLINE_LOG_BYTES, Journal, LOG_PIECE_BYTES, Result};
use crate::build::BuildId;
use crate::record::{BuilderProgress, Record};
use crate::store::LogBytes;

impl Journal {
    /// Appends bytes to a build's log; returns the offset they start at. Resolves once the
    /// bytes and their records are durable. A chunk of [`INLINE_LOG_BYTES`] or more goes into
    /// the build's segment, named by one checksummed record per [`LOG_PIECE_BYTES`] (so a
    /// reader checks a piece before serving it); a smaller one is kept in the record itself,
    /// so that many builds printing a little each share one sync instead of one each.
    pub async fn log(&self, id: BuildId, data: Vec<u8>) -> Result<u64> {
        self.log_with_progress(id, data, None).await
    }

    /// Journals how far the current attempt's builder has got: before the builder is made
    /// (`consumed` 0), so that a restart finds it by the journaled name.
    pub async fn builder_progress(&self, id: BuildId, progress: BuilderProgress) -> Result<()> {
        self.append_with(id, |_, _| Ok(vec![Record::BuilderOutput(progress)]), |_| ())
            .await
    }

    /// [`Journal::log`], and in the same commit how far those bytes took the output of the
    /// attempt's builder (`progress`): a restart then reads that output on from exactly
    /// there. Empty `data` journals the progress alone.
    pub async fn log_with_progress(
        &self,
        id: BuildId,
        data: Vec<u8>,
        progress: Option<BuilderProgress>,
    ) -> Result<u64> {
        let mut offset = 0;
        let len = data.len() as u64;
        let mut bytes = Some(data);
        self.append_with(
            id,
            |view, logs| {
                offset = view.log_len;
                let data = bytes.take().unwrap_or_default();
                let progress = progress.map(Record::BuilderOutput);
                if data.is_empty() {
                    return Ok(progress.into_iter().collect());
                }
                if data.len() < INLINE_LOG_BYTES {
                    return Ok(std::iter::once(Record::Log { offset, data })
                        .chain(progress)
                        .collect());
                }
                let mut records: Vec<Record> = data
                    .chunks(LOG_PIECE_BYTES)
                    .scan(offset, |at, piece| {
                        let record = Record::LogChecked {
                            offset: *at,
                            len: piece.len() as u64,
                            crc32: crc32fast::hash(piece),
                        };
                        *at += piece.len() as u64;
                        Some(record)
                    })
                    .collect();
                records.extend(progress);
                logs.push(LogBytes {
                    id,
                    offset,
                    bytes: data,
                });
                Ok(records)
            },
            |_| (),
        )
        .await?;
        if let Some(observer) = self.shared.observer.get() {
            observer.log_written(len);
        }
        Ok(offset)
    }
}
