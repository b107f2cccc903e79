"""The Open Inference Protocol's gRPC messages (``open_inference.proto`` beside this file), for mrad-serve.

The file is held here compiled (a serialized ``FileDescriptorProto``) and
its classes are built in a descriptor pool of their own, not protobuf's
default one: a process that also imports another copy of the protocol
(tritonclient's ``service_pb2``, KServe's ``grpc_predict_v2_pb2``, which
declare the same ``inference.*`` names) would otherwise fail on duplicate
symbols. Nothing is generated at build time and no gencode version is pinned:
any protobuf runtime from 4.25 on reads it.

After a change to the .proto (grpcio-tools installed)::

    python -m mrad.runtime.serve.open_inference_pb     # rewrites COMPILED below
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO = Path(__file__).with_name("open_inference.proto")
PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"

# -- compiled: begin (python -m mrad.runtime.serve.open_inference_pb writes this block) --
COMPILED = (
    b'\n\x14open_inference.proto\x12\tinference"\x13\n\x11ServerLiveRequest"(\n\x12ServerLiveResponse\x12\x12\n\x04live\x18\x01 \x01(\x08R\x04live'
    b'"\x14\n\x12ServerReadyRequest"+\n\x13ServerReadyResponse\x12\x14\n\x05ready\x18\x01 \x01(\x08R\x05ready"A\n\x11ModelReadyRequest\x12\x12\n\x04name'
    b'\x18\x01 \x01(\tR\x04name\x12\x18\n\x07version\x18\x02 \x01(\tR\x07version"*\n\x12ModelReadyResponse\x12\x14\n\x05ready\x18\x01 \x01(\x08R\x05ready"\x17\n\x15ServerMeta'
    b'dataRequest"f\n\x16ServerMetadataResponse\x12\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12\x18\n\x07version\x18\x02 \x01(\tR\x07version\x12\x1e\n\nextension'
    b's\x18\x03 \x03(\tR\nextensions"D\n\x14ModelMetadataRequest\x12\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12\x18\n\x07version\x18\x02 \x01(\tR\x07version"\xcf\x02\n\x15Mo'
    b'delMetadataResponse\x12\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12\x1a\n\x08versions\x18\x02 \x03(\tR\x08versions\x12\x1a\n\x08platform\x18\x03 \x01(\tR\x08platform\x12'
    b'G\n\x06inputs\x18\x04 \x03(\x0b2/.inference.ModelMetadataResponse.TensorMetadataR\x06inputs\x12I\n\x07outputs\x18\x05 \x03(\x0b2/.infe'
    b'rence.ModelMetadataResponse.TensorMetadataR\x07outputs\x1aV\n\x0eTensorMetadata\x12\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12\x1a\n\x08dat'
    b'atype\x18\x02 \x01(\tR\x08datatype\x12\x14\n\x05shape\x18\x03 \x03(\x03R\x05shape"\xd7\x01\n\x0eInferParameter\x12\x1f\n\nbool_param\x18\x01 \x01(\x08H\x00R\tboolParam\x12'
    b'!\n\x0bint64_param\x18\x02 \x01(\x03H\x00R\nint64Param\x12#\n\x0cstring_param\x18\x03 \x01(\tH\x00R\x0bstringParam\x12#\n\x0cdouble_param\x18\x04 \x01(\x01H\x00R'
    b'\x0bdoubleParam\x12#\n\x0cuint64_param\x18\x05 \x01(\x04H\x00R\x0buint64ParamB\x12\n\x10parameter_choice"\xc3\x02\n\x13InferTensorContents\x12#\n'
    b'\rbool_contents\x18\x01 \x03(\x08R\x0cboolContents\x12!\n\x0cint_contents\x18\x02 \x03(\x05R\x0bintContents\x12%\n\x0eint64_contents\x18\x03 \x03(\x03R\ri'
    b"nt64Contents\x12#\n\ruint_contents\x18\x04 \x03(\rR\x0cuintContents\x12'\n\x0fuint64_contents\x18\x05 \x03(\x04R\x0euint64Contents\x12#\n\rfp"
    b'32_contents\x18\x06 \x03(\x02R\x0cfp32Contents\x12#\n\rfp64_contents\x18\x07 \x03(\x01R\x0cfp64Contents\x12%\n\x0ebytes_contents\x18\x08 \x03(\x0cR\rby'
    b'tesContents"\x9d\x08\n\x11ModelInferRequest\x12\x1d\n\nmodel_name\x18\x01 \x01(\tR\tmodelName\x12#\n\rmodel_version\x18\x02 \x01(\tR\x0cmodelVe'
    b'rsion\x12\x0e\n\x02id\x18\x03 \x01(\tR\x02id\x12L\n\nparameters\x18\x04 \x03(\x0b2,.inference.ModelInferRequest.ParametersEntryR\nparamet'
    b'ers\x12E\n\x06inputs\x18\x05 \x03(\x0b2-.inference.ModelInferRequest.InferInputTensorR\x06inputs\x12Q\n\x07outputs\x18\x06 \x03(\x0b27.in'
    b'ference.ModelInferRequest.InferRequestedOutputTensorR\x07outputs\x12,\n\x12raw_input_contents\x18\x07 \x03(\x0cR\x10rawIn'
    b'putContents\x1a\xcd\x02\n\x10InferInputTensor\x12\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12\x1a\n\x08datatype\x18\x02 \x01(\tR\x08datatype\x12\x14\n\x05shape\x18\x03 \x03(\x03R'
    b'\x05shape\x12]\n\nparameters\x18\x04 \x03(\x0b2=.inference.ModelInferRequest.InferInputTensor.ParametersEntryR\nparam'
    b'eters\x12:\n\x08contents\x18\x05 \x01(\x0b2\x1e.inference.InferTensorContentsR\x08contents\x1aX\n\x0fParametersEntry\x12\x10\n\x03key\x18\x01 \x01('
    b'\tR\x03key\x12/\n\x05value\x18\x02 \x01(\x0b2\x19.inference.InferParameterR\x05value:\x028\x01\x1a\xf3\x01\n\x1aInferRequestedOutputTensor\x12\x12\n\x04na'
    b'me\x18\x01 \x01(\tR\x04name\x12g\n\nparameters\x18\x02 \x03(\x0b2G.inference.ModelInferRequest.InferRequestedOutputTensor.Para'
    b'metersEntryR\nparameters\x1aX\n\x0fParametersEntry\x12\x10\n\x03key\x18\x01 \x01(\tR\x03key\x12/\n\x05value\x18\x02 \x01(\x0b2\x19.inference.InferPar'
    b'ameterR\x05value:\x028\x01\x1aX\n\x0fParametersEntry\x12\x10\n\x03key\x18\x01 \x01(\tR\x03key\x12/\n\x05value\x18\x02 \x01(\x0b2\x19.inference.InferParameter'
    b'R\x05value:\x028\x01"\xdf\x05\n\x12ModelInferResponse\x12\x1d\n\nmodel_name\x18\x01 \x01(\tR\tmodelName\x12#\n\rmodel_version\x18\x02 \x01(\tR\x0cmodelV'
    b'ersion\x12\x0e\n\x02id\x18\x03 \x01(\tR\x02id\x12M\n\nparameters\x18\x04 \x03(\x0b2-.inference.ModelInferResponse.ParametersEntryR\nparam'
    b'eters\x12I\n\x07outputs\x18\x05 \x03(\x0b2/.inference.ModelInferResponse.InferOutputTensorR\x07outputs\x12.\n\x13raw_output_c'
    b'ontents\x18\x06 \x03(\x0cR\x11rawOutputContents\x1a\xd0\x02\n\x11InferOutputTensor\x12\x12\n\x04name\x18\x01 \x01(\tR\x04name\x12\x1a\n\x08datatype\x18\x02 \x01(\tR\x08da'
    b'tatype\x12\x14\n\x05shape\x18\x03 \x03(\x03R\x05shape\x12_\n\nparameters\x18\x04 \x03(\x0b2?.inference.ModelInferResponse.InferOutputTenso'
    b'r.ParametersEntryR\nparameters\x12:\n\x08contents\x18\x05 \x01(\x0b2\x1e.inference.InferTensorContentsR\x08contents\x1aX\n\x0fPar'
    b'ametersEntry\x12\x10\n\x03key\x18\x01 \x01(\tR\x03key\x12/\n\x05value\x18\x02 \x01(\x0b2\x19.inference.InferParameterR\x05value:\x028\x01\x1aX\n\x0fParameter'
    b'sEntry\x12\x10\n\x03key\x18\x01 \x01(\tR\x03key\x12/\n\x05value\x18\x02 \x01(\x0b2\x19.inference.InferParameterR\x05value:\x028\x012\xfc\x03\n\x14GRPCInferenceS'
    b'ervice\x12K\n\nServerLive\x12\x1c.inference.ServerLiveRequest\x1a\x1d.inference.ServerLiveResponse"\x00\x12N\n\x0bServerRea'
    b'dy\x12\x1d.inference.ServerReadyRequest\x1a\x1e.inference.ServerReadyResponse"\x00\x12K\n\nModelReady\x12\x1c.inference.Mo'
    b'delReadyRequest\x1a\x1d.inference.ModelReadyResponse"\x00\x12W\n\x0eServerMetadata\x12 .inference.ServerMetadataReq'
    b'uest\x1a!.inference.ServerMetadataResponse"\x00\x12T\n\rModelMetadata\x12\x1f.inference.ModelMetadataRequest\x1a .in'
    b'ference.ModelMetadataResponse"\x00\x12K\n\nModelInfer\x12\x1c.inference.ModelInferRequest\x1a\x1d.inference.ModelInf'
    b'erResponse"\x00b\x06proto3'
)
# -- compiled: end --

_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(descriptor_pb2.FileDescriptorProto.FromString(COMPILED))


def _message(name: str):
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ServerLiveRequest, ServerLiveResponse = _message("ServerLiveRequest"), _message("ServerLiveResponse")
ServerReadyRequest, ServerReadyResponse = _message("ServerReadyRequest"), _message("ServerReadyResponse")
ModelReadyRequest, ModelReadyResponse = _message("ModelReadyRequest"), _message("ModelReadyResponse")
ServerMetadataRequest, ServerMetadataResponse = _message("ServerMetadataRequest"), _message("ServerMetadataResponse")
ModelMetadataRequest, ModelMetadataResponse = _message("ModelMetadataRequest"), _message("ModelMetadataResponse")
ModelInferRequest, ModelInferResponse = _message("ModelInferRequest"), _message("ModelInferResponse")
InferParameter, InferTensorContents = _message("InferParameter"), _message("InferTensorContents")

# method -> (request class, response class), as the service declares them
METHODS = {method.name: (message_factory.GetMessageClass(method.input_type),
                         message_factory.GetMessageClass(method.output_type))
           for method in _POOL.FindServiceByName(SERVICE).methods}


def compile_proto(proto: Path = PROTO) -> bytes:
    """The .proto compiled by grpcio-tools' protoc: its serialized FileDescriptorProto."""
    import tempfile

    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "set.pb"
        if protoc.main(["protoc", f"-I{proto.parent}", f"--descriptor_set_out={out}", str(proto)]) != 0:
            raise SystemExit(f"protoc could not compile {proto}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0].SerializeToString()


def _rewrite(compiled: bytes) -> None:
    here = Path(__file__)
    text = here.read_text()
    begin, end = text.index("# -- compiled: begin"), text.index("# -- compiled: end --")
    begin = text.index("\n", begin) + 1
    lines = [repr(compiled[i:i + 96]) for i in range(0, len(compiled), 96)]
    block = "COMPILED = (\n" + "".join(f"    {line}\n" for line in lines) + ")\n"
    here.write_text(text[:begin] + block + text[end:])


if __name__ == "__main__":
    _rewrite(compile_proto())
