#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Create the security group cluster.yaml expects (SecurityGroupIds): all traffic between the cluster's own
# nodes, SSH from one address range, nothing else inbound. Prints the new group's id.
#
#   deploy/aws-security-group.sh SSH_CIDR [REGION] [VPC_ID] [GROUP_NAME]
#   deploy/aws-security-group.sh "$(curl -s https://checkip.amazonaws.com)/32"
#
# Why not Ray's own group: when no SecurityGroupIds are given, `ray up` creates one whose SSH rule is open
# to 0.0.0.0/0. The Ray dashboard (8265), the GCS (6379) and MLflow (5000) are never opened here: they are
# reached through SSH tunnels (`ray dashboard cluster.yaml`, ssh -L), see docs/cluster.md.
set -euo pipefail

cidr=${1:?usage: aws-security-group.sh SSH_CIDR [REGION] [VPC_ID] [GROUP_NAME]}
region=${2:-us-west-2}
vpc=${3:-}
name=${4:-otarena-ray}

case "$cidr" in
  0.0.0.0/* | ::/0)
    echo "aws-security-group.sh: refusing to open SSH to the whole internet ($cidr); give your own range," \
         "e.g. \"\$(curl -s https://checkip.amazonaws.com)/32\"" >&2
    exit 2 ;;
esac
if ! [[ $cidr =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/([0-9]|[12][0-9]|3[0-2])$ ]]; then
  echo "aws-security-group.sh: '$cidr' is not an IPv4 CIDR such as 203.0.113.7/32" >&2
  exit 2
fi

if [ -z "$vpc" ]; then
  vpc=$(aws ec2 describe-vpcs --region "$region" --filters Name=isDefault,Values=true \
        --query 'Vpcs[0].VpcId' --output text)
fi
if [ -z "$vpc" ] || [ "$vpc" = None ]; then
  echo "aws-security-group.sh: no default VPC in $region; pass VPC_ID" >&2
  exit 2
fi

sg=$(aws ec2 create-security-group --region "$region" --vpc-id "$vpc" --group-name "$name" \
     --description "otarena Ray cluster: intra-cluster traffic and SSH from $cidr" \
     --query GroupId --output text)
aws ec2 authorize-security-group-ingress --region "$region" --group-id "$sg" --ip-permissions \
  "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$sg,Description=ray-intra-cluster}]" \
  "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$cidr,Description=ssh}]" >/dev/null
echo "$sg"
