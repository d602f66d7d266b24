// The protocol version both sides send and check (proto/flexfed/v1/flexfed.proto, docs/PROTOCOL.md).
// Bump the minor for additions old peers can ignore; a new major is a new package (v2).
#pragma once

namespace flexfed {

inline constexpr char kProtocolHeader[] = "flexfed-protocol";
inline constexpr int kProtocolMajor = 1;
// 1.1: releases (BuildRelease, GetRelease, ListReleases); 1.2: ReenrollOwner, TailAudit pages
// (skip, more), CheckStore.
inline constexpr int kProtocolMinor = 2;
inline constexpr char kProtocolVersion[] = "1.2";

}  // namespace flexfed
