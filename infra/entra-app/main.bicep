// OPTIONAL, off by default: the Entra app registration of the connector, created with the Microsoft
// Graph Bicep extension (https://learn.microsoft.com/graph/templates/bicep/overview-bicep-templates-for-graph).
// Deploying it needs Entra rights to create applications (Application Developer / Application.ReadWrite.All),
// which the azd deployment of infra/main.bicep does not; that is why it is a separate template with its
// own bicepconfig.json (the extension's registry version is pinned there, and infra/main.bicep never
// needs it). docs/deploy.md ("Option B") runs it after the first `azd provision`:
//
//   az deployment group create -g "$AZURE_RESOURCE_GROUP" -f infra/entra-app/main.bicep \
//     -p redirectUri="$REDIRECT_URI" msTenant=organizations \
//        managedIdentityPrincipalId="$MANAGED_IDENTITY_PRINCIPAL_ID" federatedCredentialIssuer="$FEDERATED_CREDENTIAL_ISSUER"
//
// It creates: the application (Web redirect URI, the delegated Graph permissions the connector asks
// for and, for team mailboxes, the application permissions of MS_APP_ROLES that a tenant administrator
// grants through admin consent: docs/team-mailboxes.md), its service principal, and - for MS_CLIENT_CREDENTIAL=managed_identity - the federated
// identity credential that trusts the function app's user-assigned managed identity
// (https://learn.microsoft.com/entra/workload-id/workload-identity-federation-config-app-trust-managed-identity).
// No secret and no certificate is created: add one in the portal if you choose those credentials.
//
// Requirements: Bicep CLI v0.36.1 or later, the minimum for the Microsoft Graph extension types pinned in
// bicepconfig.json (microsoftgraph/v1.0 1.0.0). The extension works in the Azure public cloud only
// (not in Azure US Government, China or other sovereign clouds); there, create the registration in the portal.

extension microsoftGraphV1

@description('Unique name (and display name) of the application.')
param appName string = 'mailbox-connector-${uniqueString(resourceGroup().id)}'

@description('MS_TENANT the connector will use; sets the supported account types (signInAudience).')
param msTenant string = 'organizations'

@description('Exactly the REDIRECT_URI output of infra/main.bicep.')
param redirectUri string

@description('Object (principal) id of the function app\'s user-assigned identity (MANAGED_IDENTITY_PRINCIPAL_ID); empty: no federated credential.')
param managedIdentityPrincipalId string = ''

@description('Issuer of the identity\'s tokens (FEDERATED_CREDENTIAL_ISSUER output): https://login.microsoftonline.com/<tenant id>/v2.0.')
param federatedCredentialIssuer string = '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'

@description('Declare the application permissions for team mailboxes (MS_APP_ROLES: Mail.ReadWrite, Mail.Send). Declaring grants nothing: a tenant administrator consents (docs/team-mailboxes.md).')
param teamMailboxes bool = true

@description('Audience of the federated credential (MS_CLIENT_ASSERTION_AUDIENCE).')
param federatedCredentialAudience string = 'api://AzureADTokenExchange'

// signInAudience from the tenant segment. A federated credential is only honoured for work/school
// sign-ins: with common / consumers (personal accounts) the connector refuses managed_identity at
// start-up, and no federated credential is created here.
var signInAudience = msTenant == 'common' ? 'AzureADandPersonalMicrosoftAccount' : msTenant == 'consumers' ? 'PersonalMicrosoftAccount' : msTenant == 'organizations' ? 'AzureADMultipleOrgs' : 'AzureADMyOrg'
var personalAccounts = msTenant == 'common' || msTenant == 'consumers'

// Microsoft Graph's app id and the ids of its delegated permissions (oauth2PermissionScopes), the same in
// every tenant: https://learn.microsoft.com/graph/permissions-reference
var graphAppId = '00000003-0000-0000-c000-000000000000'
var delegatedScopes = {
  offlineAccess: '7427e0e9-2fba-42fe-b0c0-848c9e6a8182'
  openid: '37f7f235-527c-4136-accd-4a02d197296e'
  profile: '14dad69e-099b-42c9-810b-d002981feec1'
  userRead: 'e1fe6dd8-ba31-4d61-89e7-88639da4683d'
  mailReadWrite: '024d486e-b451-40bb-833d-3e66d98c5c73'
  mailSend: 'e383f46e-2787-4529-855e-0e479a3ffac0'
}
// ... and of its application permissions (appRoles), granted only by admin consent: MS_APP_ROLES.
var applicationRoles = {
  mailReadWrite: 'e2a3a72e-5f79-4c64-b1b1-878b674786c9'
  mailSend: 'b633e1c5-b582-4048-a93e-9f11b44c7e96'
}
var scopeAccess = [for scope in items(delegatedScopes): {
  id: scope.value
  type: 'Scope'
}]
var roleAccess = [for role in items(applicationRoles): {
  id: role.value
  type: 'Role'
}]

resource app 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: appName
  displayName: appName
  signInAudience: signInAudience
  // Personal-account audiences require v2 access tokens ("api.requestedAccessTokenVersion is invalid"
  // otherwise); harmless for the organisational ones.
  api: {
    requestedAccessTokenVersion: 2
  }
  web: {
    redirectUris: [
      redirectUri
    ]
    implicitGrantSettings: {
      enableAccessTokenIssuance: false
      enableIdTokenIssuance: false
    }
  }
  // Team mailboxes: the signed-in user's directory roles in the id token (wids), so the connector can tell that
  // the person granting admin consent is an administrator (docs/team-mailboxes.md).
  groupMembershipClaims: teamMailboxes && !personalAccounts ? 'DirectoryRole' : 'None'
  requiredResourceAccess: [
    {
      resourceAppId: graphAppId
      resourceAccess: concat(scopeAccess, teamMailboxes && !personalAccounts ? roleAccess : [])
    }
  ]
}

resource servicePrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: app.appId
}

resource federatedCredential 'Microsoft.Graph/applications/federatedIdentityCredentials@v1.0' = if (!empty(managedIdentityPrincipalId) && !personalAccounts) {
  name: '${app.uniqueName}/function-app-identity'
  description: 'The connector function app\'s user-assigned managed identity (MS_CLIENT_CREDENTIAL=managed_identity).'
  issuer: federatedCredentialIssuer
  subject: managedIdentityPrincipalId
  audiences: [
    federatedCredentialAudience
  ]
}

@description('Set it as MS_CLIENT_ID: azd env set MS_CLIENT_ID <appId>.')
output MS_CLIENT_ID string = app.appId
output SIGN_IN_AUDIENCE string = signInAudience
