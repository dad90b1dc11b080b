//! The server side of a TLS connection, with buffers that are released as
//! soon as they are empty.
//!
//! tokio-rustls drives rustls' buffered API, which allocates a 4 KiB receive
//! buffer at the first read and keeps it for the connection's whole life.
//! With 10,000 connections waiting for their next request that is 40 MB of
//! empty buffers. [`TlsStream`] drives rustls' unbuffered API instead
//! (`UnbufferedServerConnection`): it owns the receive, plaintext and send
//! buffers itself and frees each one when it has been drained, so a
//! connection at rest holds its TLS session and nothing else.
//!
//! The protocol stays rustls' own: handshake, record protection, alerts,
//! key updates and close_notify are all done by rustls' state machine; this
//! module only moves bytes between it and the socket.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConfig, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes asked of the socket per read.
const READ_SIZE: usize = 4096;

/// The most received, not yet processed TLS data held: rustls' own bounds,
/// one handshake message of 64 KiB (joined from records) plus one record
/// (16 KiB of payload and its overhead).
const MAX_RECEIVED: usize = 0x10000 + 16384 + 2048 + 5;

/// Encrypted data queued for the socket above which writes wait for it to
/// drain.
const MAX_QUEUED: usize = 64 * 1024;

/// The most plaintext encrypted per write call.
const MAX_WRITE: usize = 64 * 1024;

/// Bytes a record adds to at most 16 KiB of plaintext: header, content
/// type and tag in TLS 1.3 (22), header, explicit nonce and tag with
/// AES-GCM in TLS 1.2 (29).
const RECORD_OVERHEAD: usize = 32;

/// A server-side TLS stream over `IO`, made by [`accept`].
pub struct TlsStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// Received TLS bytes: `incoming[..received]`.
    incoming: Vec<u8>,
    received: usize,
    /// Decrypted application data not yet read: `plaintext[read..]`.
    plaintext: Vec<u8>,
    read: usize,
    /// TLS bytes for the peer not yet sent: `outgoing[sent..]`.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer sent close_notify: the end of its data.
    peer_closed: bool,
    /// We queued our close_notify.
    close_queued: bool,
}

/// What one pass through rustls' state machine asked for.
enum Step {
    /// Something was done; ask again.
    Again,
    /// rustls needs more bytes from the peer.
    NeedData,
    /// Nothing to process; application data may be sent.
    Writable,
    /// What the caller asked to send was encrypted and queued.
    Queued,
    /// Both sides closed.
    Closed,
}

/// What a step should send once the connection may send.
#[derive(Clone, Copy)]
enum Out<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// Runs the server side of a TLS handshake on `io`.
pub async fn accept<IO>(config: Arc<ServerConfig>, io: IO) -> io::Result<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
    let mut stream = TlsStream {
        io,
        conn,
        incoming: Vec::new(),
        received: 0,
        plaintext: Vec::new(),
        read: 0,
        outgoing: Vec::new(),
        sent: 0,
        peer_closed: false,
        close_queued: false,
    };
    poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

impl<IO> TlsStream<IO> {
    /// The underlying socket.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The certificate chain the client presented, leaf first.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Whether the peer's bytes are already here, received with the
    /// handshake: application data, a partial record or close_notify.
    pub fn has_buffered_input(&self) -> bool {
        self.read < self.plaintext.len() || self.received > 0 || self.peer_closed
    }

    /// Bytes of buffer this stream holds beyond rustls' own state.
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }

    /// One pass through rustls' state machine over the received bytes.
    fn step(&mut self, send: Out<'_>) -> io::Result<Step> {
        let status = self
            .conn
            .process_tls_records(&mut self.incoming[..self.received]);
        let discard = status.discard;
        let step = match status.state {
            Err(e) => Err(e),
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                let mut result = Ok(Step::Again);
                while let Some(record) = traffic.next_record() {
                    match record {
                        Ok(record) => self.plaintext.extend_from_slice(record.payload),
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                result
            }
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                append(&mut self.outgoing, 512, |buf| {
                    data.encode(buf).map_err(|e| match e {
                        EncodeError::InsufficientSize(s) => Some(s.required_size),
                        EncodeError::AlreadyEncoded => None,
                    })
                })
                .map(|()| Step::Again)
            }
            // The bytes stay queued in `outgoing` until the socket takes
            // them, in order, before anything encoded later.
            Ok(ConnectionState::TransmitTlsData(data)) => {
                data.done();
                Ok(Step::Again)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Step::NeedData),
            Ok(ConnectionState::WriteTraffic(mut traffic)) => match send {
                Out::Nothing => Ok(Step::Writable),
                Out::Data(data) => {
                    let room = data.len() + RECORD_OVERHEAD * (data.len() / 16384 + 1);
                    append(&mut self.outgoing, room, |buf| {
                        traffic.encrypt(data, buf).map_err(insufficient)
                    })
                    .map(|()| Step::Queued)
                }
                Out::CloseNotify => append(&mut self.outgoing, 64, |buf| {
                    traffic.queue_close_notify(buf).map_err(insufficient)
                })
                .map(|()| Step::Queued),
            },
            Ok(ConnectionState::PeerClosed) => {
                self.peer_closed = true;
                Ok(Step::Again)
            }
            Ok(ConnectionState::Closed) => {
                self.peer_closed = true;
                Ok(Step::Closed)
            }
            // The server configuration accepts no early data.
            Ok(_) => Err(rustls::Error::General("unexpected TLS state".into())),
        };
        self.discard(discard);
        match step {
            Ok(step) => Ok(step),
            Err(e) => {
                self.queue_alert();
                Err(invalid_data(e))
            }
        }
    }

    /// After an error, queues the alert rustls prepared for the peer.
    fn queue_alert(&mut self) {
        // An alert is one record; the bound only guards against surprises.
        for _ in 0..4 {
            let status = self
                .conn
                .process_tls_records(&mut self.incoming[..self.received]);
            let discard = status.discard;
            let more = match status.state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    append(&mut self.outgoing, 64, |buf| {
                        data.encode(buf).map_err(|_| None)
                    })
                    .is_ok()
                }
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    data.done();
                    true
                }
                _ => false,
            };
            self.discard(discard);
            if !more {
                return;
            }
        }
    }

    fn discard(&mut self, n: usize) {
        if n > 0 {
            self.incoming.copy_within(n..self.received, 0);
            self.received -= n;
        }
    }

    /// Frees the receive buffer once nothing is left in it.
    fn release_incoming(&mut self) {
        if self.received == 0 {
            self.incoming = Vec::new();
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    /// [`Self::step`] with nothing to send; after an error the peer is told
    /// why, if the socket takes the alert now.
    fn advance(&mut self, cx: &mut Context<'_>) -> io::Result<Step> {
        self.step(Out::Nothing).inspect_err(|_| {
            let _ = self.poll_send(cx);
        })
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.advance(cx)? {
                Step::Again => continue,
                Step::Writable if !self.conn.is_handshaking() => {
                    // The session tickets go out with the handshake.
                    ready!(self.poll_send(cx))?;
                    self.release_incoming();
                    return Poll::Ready(Ok(()));
                }
                Step::Closed => return Poll::Ready(Err(closed_in_handshake())),
                Step::NeedData | Step::Writable | Step::Queued => {
                    if self.peer_closed {
                        return Poll::Ready(Err(closed_in_handshake()));
                    }
                    // Our flight goes out before we wait for the peer's.
                    ready!(self.poll_send(cx))?;
                    if ready!(self.poll_receive(cx))? == 0 {
                        return Poll::Ready(Err(closed_in_handshake()));
                    }
                }
            }
        }
    }

    /// Sends what is queued; frees the send buffer once it is all sent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads more TLS bytes from the socket; `Ok(0)` at its end.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.received >= MAX_RECEIVED {
            return Poll::Ready(Err(invalid_data("TLS message too large")));
        }
        let want = (self.received + READ_SIZE).min(MAX_RECEIVED);
        if self.incoming.len() < want {
            self.incoming.resize(want, 0);
        }
        let mut buf = ReadBuf::new(&mut self.incoming[self.received..]);
        match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                self.received += n;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.release_incoming();
                Poll::Pending
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.read < this.plaintext.len() {
                let n = buf.remaining().min(this.plaintext.len() - this.read);
                buf.put_slice(&this.plaintext[this.read..this.read + n]);
                this.read += n;
                if this.read == this.plaintext.len() {
                    this.plaintext = Vec::new();
                    this.read = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            match this.advance(cx)? {
                Step::Again => continue,
                Step::Closed => return Poll::Ready(Ok(())),
                Step::NeedData | Step::Writable | Step::Queued => {
                    // Whatever processing produced (a key update, say) goes
                    // out without holding up the read.
                    if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                        return Poll::Ready(Err(e));
                    }
                    if ready!(this.poll_receive(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed connection without sending TLS close_notify",
                        )));
                    }
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_queued {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.outgoing.len() - this.sent >= MAX_QUEUED {
            ready!(this.poll_send(cx))?;
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        loop {
            match this.step(Out::Data(data))? {
                Step::Queued => break,
                Step::Again => continue,
                Step::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                // Only reachable before the handshake is complete, which
                // `accept` rules out.
                Step::NeedData | Step::Writable => {
                    return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
                }
            }
        }
        // Start sending; what the socket does not take now stays queued,
        // bounded by `MAX_QUEUED`, until the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            this.close_queued = true;
            // Best effort, as with a failed connection there is nothing to
            // close cleanly.
            for _ in 0..8 {
                match this.step(Out::CloseNotify) {
                    Ok(Step::Again) => continue,
                    _ => break,
                }
            }
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Appends what `encode` writes to `out`, first offering `room` bytes and
/// then as many as it asks for; `None` from `encode` is a failure.
fn append(
    out: &mut Vec<u8>,
    mut room: usize,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> Result<(), rustls::Error> {
    let start = out.len();
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Some(required)) if required > room => room = required,
            Err(_) => {
                out.truncate(start);
                return Err(rustls::Error::General(
                    "TLS record could not be encoded".into(),
                ));
            }
        }
    }
}

fn insufficient(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        EncryptError::EncryptExhausted => None,
    }
}

fn invalid_data<E>(e: E) -> io::Error
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn closed_in_handshake() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "connection closed during the TLS handshake",
    )
}

#[cfg(test)]
mod tests {
    //! A tokio-rustls client against [`TlsStream`] over an in-memory pipe
    //! small enough that both sides often wait for the other.
    use std::sync::Arc;

    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConfig, RootCertStore, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_rustls::client::TlsStream as ClientTls;

    use super::{accept, TlsStream};
    use crate::pki::{DevCa, Issued};

    fn chain(issued: &Issued) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let certs = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("certificate");
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key");
        (certs, key)
    }

    fn roots(ca: &DevCa) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("CA"))
            .expect("root");
        Arc::new(roots)
    }

    struct Pki {
        server: Arc<ServerConfig>,
        ca: DevCa,
    }

    fn pki() -> Pki {
        let provider = crate::tls::provider();
        let ca = DevCa::generate("tls_io test CA").expect("CA");
        let (certs, key) = chain(&ca.issue_server(&["localhost"]).expect("server cert"));
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&ca), provider.clone())
            .build()
            .expect("verifier");
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .expect("server config");
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Pki {
            server: Arc::new(server),
            ca,
        }
    }

    fn client_config(
        pki: &Pki,
        client_ca: &DevCa,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Arc<ClientConfig> {
        let (certs, key) = chain(&client_ca.issue_client("dept-test").expect("client cert"));
        presenting(pki, certs, key, version)
    }

    /// A client trusting `pki`'s CA that presents `certs`.
    fn presenting(
        pki: &Pki,
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Arc<ClientConfig> {
        let config = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_root_certificates(roots(&pki.ca))
            .with_client_auth_cert(certs, key)
            .expect("client config");
        Arc::new(config)
    }

    /// Sends `bytes` from one end and checks they arrive at the other.
    async fn crosses(
        from: &mut (impl AsyncWriteExt + Unpin),
        to: &mut (impl AsyncReadExt + Unpin),
        bytes: &[u8],
    ) {
        from.write_all(bytes).await.expect("write");
        from.flush().await.expect("flush");
        let mut got = vec![0; bytes.len()];
        to.read_exact(&mut got).await.expect("read");
        assert_eq!(got, bytes);
    }

    /// Both ends of one connection, after the handshake.
    async fn connect(
        pki: &Pki,
        client: Arc<ClientConfig>,
    ) -> (
        std::io::Result<TlsStream<DuplexStream>>,
        std::io::Result<ClientTls<DuplexStream>>,
    ) {
        let (near, far) = tokio::io::duplex(4096);
        let connector = tokio_rustls::TlsConnector::from(client);
        let name = ServerName::try_from("localhost").expect("name");
        tokio::join!(
            accept(pki.server.clone(), near),
            connector.connect(name, far)
        )
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn data_crosses_both_ways_and_no_buffer_is_kept_at_rest() {
        let pki = pki();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (server, client) = connect(&pki, client_config(&pki, &pki.ca, version)).await;
            let (mut server, mut client) = (server.expect("accepted"), client.expect("connected"));
            let leaf = server.peer_certificates().expect("client certificate");
            assert_eq!(leaf.len(), 1);
            assert_eq!(
                server.buffered_capacity(),
                0,
                "{version:?}: after handshake"
            );

            // Larger than a record, than the pipe and than one write call.
            let request = pattern(150_000, 7);
            let response = pattern(300_000, 11);
            let (got, ()) = tokio::join!(
                async {
                    let mut got = vec![0; request.len()];
                    server.read_exact(&mut got).await.expect("server read");
                    server.write_all(&response).await.expect("server write");
                    server.flush().await.expect("server flush");
                    got
                },
                async {
                    client.write_all(&request).await.expect("client write");
                    client.flush().await.expect("client flush");
                    let mut back = vec![0; response.len()];
                    client.read_exact(&mut back).await.expect("client read");
                    assert!(back == response, "{version:?}: response bytes differ");
                }
            );
            assert!(got == request, "{version:?}: request bytes differ");
            // Waiting for the next request, as a served connection does.
            let mut next = [0; 1];
            let waited =
                tokio::time::timeout(std::time::Duration::from_millis(50), server.read(&mut next))
                    .await;
            assert!(waited.is_err(), "{version:?}: nothing was sent");
            assert_eq!(
                server.buffered_capacity(),
                0,
                "{version:?}: buffers kept while waiting"
            );

            // A TLS 1.3 key update from the client is followed.
            if version == &rustls::version::TLS13 {
                client
                    .get_mut()
                    .1
                    .refresh_traffic_keys()
                    .expect("key update");
            }
            crosses(&mut client, &mut server, b"after").await;
            crosses(&mut server, &mut client, b"reply").await;
        }
    }

    #[tokio::test]
    async fn close_notify_ends_the_stream_and_a_bare_end_is_an_error() {
        let pki = pki();
        let config = client_config(&pki, &pki.ca, &rustls::version::TLS13);

        // The client closes cleanly: the server reads the end of the stream.
        let (server, client) = connect(&pki, config.clone()).await;
        let (mut server, mut client) = (server.expect("accepted"), client.expect("connected"));
        client.write_all(b"last").await.expect("write");
        client.shutdown().await.expect("client close_notify");
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("clean end");
        assert_eq!(rest, b"last");

        // The server closes cleanly: the client sees close_notify.
        let (server, client) = connect(&pki, config.clone()).await;
        let (mut server, mut client) = (server.expect("accepted"), client.expect("connected"));
        server.shutdown().await.expect("server close_notify");
        let mut rest = Vec::new();
        client
            .read_to_end(&mut rest)
            .await
            .expect("close_notify, not a bare end");

        // The socket ends without close_notify: an error, as with rustls'
        // own reader, so a truncated request is never taken as complete.
        let (server, client) = connect(&pki, config).await;
        let (mut server, client) = (server.expect("accepted"), client.expect("connected"));
        drop(client);
        let mut rest = Vec::new();
        let err = server.read_to_end(&mut rest).await.expect_err("bare end");
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_handshake_message_spanning_several_records_is_joined() {
        // The client's certificate message, with 60 unrelated CA
        // certificates after its leaf, is larger than a record (16 KiB)
        // and many times the read size.
        let pki = pki();
        let (mut certs, key) = chain(&pki.ca.issue_client("dept-test").expect("client cert"));
        for i in 0..60 {
            let filler = DevCa::generate(&format!("filler {i}")).expect("filler");
            certs.push(CertificateDer::from_pem_slice(filler.cert_pem.as_bytes()).expect("filler"));
        }
        let size: usize = certs.iter().map(|c| c.len()).sum();
        assert!(size > 20_000, "the chain is only {size} bytes");
        let config = presenting(&pki, certs, key, &rustls::version::TLS13);
        let (server, client) = connect(&pki, config).await;
        let (mut server, mut client) = (server.expect("accepted"), client.expect("connected"));
        assert_eq!(server.peer_certificates().map(<[_]>::len), Some(61));
        crosses(&mut client, &mut server, b"ping").await;
    }

    #[tokio::test]
    async fn a_refused_client_certificate_is_told_why() {
        let pki = pki();
        let stranger = DevCa::generate("another CA").expect("CA");
        let (server, client) = connect(
            &pki,
            client_config(&pki, &stranger, &rustls::version::TLS13),
        )
        .await;
        assert!(server.is_err(), "a certificate of another CA was accepted");
        // In TLS 1.3 the client finishes its side before the server has
        // checked its certificate; the server's alert arrives on the next
        // read.
        let mut client = client.expect("client side of the handshake");
        let mut buf = [0; 16];
        let err = client.read(&mut buf).await.expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("alert") && text.contains("UnknownCA"),
            "the client was not told why: {text}"
        );
    }
}
