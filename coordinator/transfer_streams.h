// The coordinator's two streaming RPCs as gRPC callback reactors: chunk uploads (client stream) and
// blob downloads (server stream). Protocol: docs/PROTOCOL.md, "Transfers" and "Limits".
#pragma once

#include <grpcpp/grpcpp.h>

#include <string>

#include "coordinator/service_parts.h"
#include "flexfed/v1/flexfed.pb.h"

namespace flexfed {

// `role` as Authorize's: the Admin service's uploads are for operators only. The reactor deletes
// itself when gRPC is done with the call.
grpc::ServerReadReactor<v1::UploadChunk>* NewUploadStream(const ServiceParts& parts, grpc::CallbackServerContext* ctx,
                                                          v1::UploadStatus* response, const std::string& role);
grpc::ServerWriteReactor<v1::DataChunk>* NewDownloadStream(const ServiceParts& parts, grpc::CallbackServerContext* ctx,
                                                           const v1::DownloadRequest* request);

}  // namespace flexfed
