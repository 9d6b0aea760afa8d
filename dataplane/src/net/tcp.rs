//! The kernel TCP transport: non-blocking listeners and streams (mio over epoll), with
//! TCP_NODELAY so small responses are not held back by Nagle's algorithm.

use mio::net::{TcpListener, TcpStream};
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;

/// Binds a listening socket on a portal address.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// Prepares an accepted stream for iSCSI traffic.
pub fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}

/// Reads into `buf`; `Ok(None)` when the socket has no more bytes now.
pub fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match stream.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Writes vectored; `Ok(None)` when the socket buffer is full.
pub fn write_some(stream: &mut TcpStream, iov: &[IoSlice<'_>]) -> io::Result<Option<usize>> {
    loop {
        match stream.write_vectored(iov) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}
