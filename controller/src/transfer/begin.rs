//! The first record of a ZFS stream, checked before `zfs receive` sees a byte of it: the
//! stream must begin with a BEGIN record of a *substream*, one snapshot's data and nothing
//! else, so that bytes which are not a ZFS stream fail with a clear message instead of
//! whatever `zfs receive` makes of them.
//!
//! Compound streams are refused outright: they are what `zfs send -R`, `-p` and `-I` make, a
//! package that can carry the sender's properties (`mountpoint=/etc`, `setuid`, a
//! `reservation` as large as the pool) and child datasets. ployz's own sender sends one
//! snapshot per stream (`zfs send -i`, `zfs::base::steps`), so it never makes one. The
//! receiver's neutralizing (`receive -x`/`-o`, `Server::contain`) stays as a second line.
//!
//! Layout (OpenZFS `zfs_ioctl.h`, `dmu_replay_record_t`): `drr_type: u32` (0 = BEGIN),
//! `drr_payloadlen: u32`, then `drr_begin`: `drr_magic: u64` (0x2F5bacbac), `drr_versioninfo:
//! u64`, whose low two bits are the header type (1 = substream, 2 = compound). The sender's
//! byte order: a byte-swapped magic means the other one.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::AsyncWrite;

const MAGIC: u64 = 0x2_F5BA_CBAC;
const DRR_BEGIN: u32 = 0;
const SUBSTREAM: u64 = 1;
const COMPOUND: u64 = 2;
/// Bytes of the header that decide.
pub const HEAD: usize = 24;

/// Why a stream was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BeginError {
    #[error("the stream does not start with a ZFS BEGIN record")]
    NotAStream,
    #[error("the stream's header type {0} is unknown")]
    UnknownType(u64),
    #[error(
        "the stream is a compound stream (zfs send -R, -p or -I), which can carry properties and child datasets; ployz receives one snapshot per stream (zfs send -i) and nothing else"
    )]
    Compound,
}

/// Checks the first [`HEAD`] bytes of a stream.
pub fn check(head: &[u8; HEAD]) -> Result<(), BeginError> {
    let u32_at = |i: usize, swap: bool| {
        let b = [head[i], head[i + 1], head[i + 2], head[i + 3]];
        if swap {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    let u64_at = |i: usize, swap: bool| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[i..i + 8]);
        if swap {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        }
    };
    let swap = match (u64_at(8, false), u64_at(8, true)) {
        (MAGIC, _) => false,
        (_, MAGIC) => true,
        _ => return Err(BeginError::NotAStream),
    };
    if u32_at(0, swap) != DRR_BEGIN {
        return Err(BeginError::NotAStream);
    }
    match u64_at(16, swap) & 3 {
        SUBSTREAM => Ok(()),
        COMPOUND => Err(BeginError::Compound),
        other => Err(BeginError::UnknownType(other)),
    }
}

/// Passes a stream to `inner` once its first record is checked; fails the write otherwise, so
/// nothing of a refused stream reaches `zfs receive`.
#[derive(Debug)]
pub struct BeginCheck<W> {
    inner: W,
    head: Vec<u8>,
    /// Bytes of `head` already written to `inner`, once checked.
    flushed: usize,
    checked: bool,
}

impl<W> BeginCheck<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            head: Vec::with_capacity(HEAD),
            flushed: 0,
            checked: false,
        }
    }
}

fn refused(e: BeginError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

impl<W: AsyncWrite + Unpin> BeginCheck<W> {
    /// Writes the checked header to `inner`.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.checked && self.flushed < self.head.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.head[self.flushed..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.flushed += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for BeginCheck<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if !this.checked {
            let take = (HEAD - this.head.len()).min(buf.len());
            this.head.extend_from_slice(&buf[..take]);
            if let Ok(head) = <&[u8; HEAD]>::try_from(this.head.as_slice()) {
                check(head).map_err(refused)?;
                this.checked = true;
            }
            return Poll::Ready(Ok(take));
        }
        ready!(this.poll_head(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_head(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.checked && !this.head.is_empty() {
            return Poll::Ready(Err(refused(BeginError::NotAStream)));
        }
        ready!(this.poll_head(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    fn header(hdrtype: u64, big_endian: bool) -> Vec<u8> {
        let versioninfo = (17u64 << 2) | hdrtype;
        let mut h = vec![];
        if big_endian {
            h.extend(DRR_BEGIN.to_be_bytes());
            h.extend(0u32.to_be_bytes());
            h.extend(MAGIC.to_be_bytes());
            h.extend(versioninfo.to_be_bytes());
        } else {
            h.extend(DRR_BEGIN.to_le_bytes());
            h.extend(0u32.to_le_bytes());
            h.extend(MAGIC.to_le_bytes());
            h.extend(versioninfo.to_le_bytes());
        }
        h
    }

    fn head(v: &[u8]) -> [u8; HEAD] {
        let mut h = [0u8; HEAD];
        h.copy_from_slice(&v[..HEAD]);
        h
    }

    #[test]
    fn substreams_pass_in_either_byte_order_and_anything_else_does_not() {
        for big_endian in [false, true] {
            assert_eq!(check(&head(&header(SUBSTREAM, big_endian))), Ok(()));
            assert_eq!(
                check(&head(&header(COMPOUND, big_endian))),
                Err(BeginError::Compound)
            );
        }
        assert_eq!(
            check(&head(&header(3, false))),
            Err(BeginError::UnknownType(3))
        );
        assert_eq!(check(&[0xAB; HEAD]), Err(BeginError::NotAStream));
        let mut not_begin = header(SUBSTREAM, false);
        not_begin[0] = 7;
        assert_eq!(check(&head(&not_begin)), Err(BeginError::NotAStream));
    }

    #[tokio::test]
    async fn a_checked_stream_arrives_whole_however_it_is_split() {
        let mut stream = header(SUBSTREAM, false);
        stream.extend(b"the rest of the stream");
        let mut out = vec![];
        let mut w = BeginCheck::new(&mut out);
        for piece in stream.chunks(5) {
            w.write_all(piece).await.unwrap_or_else(|e| panic!("{e}"));
        }
        w.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, stream);
    }

    #[tokio::test]
    async fn nothing_of_a_refused_stream_is_written() {
        let mut stream = b"GET / HTTP/1.1\r\nHost: ployz\r\n".to_vec();
        stream.extend(header(SUBSTREAM, false));
        let mut out = vec![];
        let mut w = BeginCheck::new(&mut out);
        let r = w.write_all(&stream).await;
        assert!(r.is_err_and(|e| e.to_string().contains("ZFS BEGIN record")));
        assert!(out.is_empty());
    }
}
